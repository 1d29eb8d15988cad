"""A single-process reference for DiLoCo (issue 14), written from docs' contract
(notes/diloco-design.md) and not from meshtrain.diloco: the K islands run one after another in this
process, each a single-device copy of the model, and the outer step is the formula written out.

Per island k (of K, each of `dp` data-parallel ranks), step s (0-based; trainer step t = s + 1):
  - batch: the union of the sequences of data ranks k*dp .. k*dp+dp-1 of BatchSampler(size=K*dp),
  - loss: the mean token cross-entropy over that batch (global_batch / K sequences), its gradient
    accumulated over the ranks' micro-batches in turn (only the rounding depends on that),
  - inner step: gradient norm (float64, over the island's whole gradient), clip to training.grad_clip
    by grad_clip / (norm + 1e-6) when above it, meshtrain's AdamW at lr_at(s) (no decay on vectors).
Then at every sync point (t % (H/F) == 0, the j-th of them syncing fragment (j-1) mod F), the
outer step of that fragment over all islands, Nesterov momentum by hand:
    delta_k = g - theta_k ; mean = sum_k delta_k / K
    m <- mu*m + mean ; g <- g - lr*(mean + mu*m) ; theta_k <- g
or, overlapped (delay 1), with s_k where island k's round began (initially g):
    delta_k = s_k - theta_k (the round's own progress); apply the mean in flight (launched at the
    fragment's previous sync) to g, if any; theta_k <- s_k <- g - delta_k; put mean_k delta_k in flight;
and after the last step, every fragment's mean in flight is applied the same way (theta_k <- g - (s_k - theta_k)).
Only the fp32 codec (an exact mean) is modelled.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from meshtrain.config import Config
from meshtrain.data import BatchSampler, build_dataset, build_tokenizer
from meshtrain.loss import cross_entropy_sum
from meshtrain.model import build_model
from meshtrain.optim import AdamW, lr_at

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Diloco:
    """The outer loop's settings: what parallel.diloco and the [diloco] section say."""

    islands: int
    inner_steps: int
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    fragments: int = 1
    overlap: bool = False
    outer: bool = True
    """False: no outer step at all (K islands training alone), for showing the outer step matters."""

    def __post_init__(self) -> None:
        if self.inner_steps % self.fragments:
            raise ValueError(f"inner_steps {self.inner_steps} is not a multiple of fragments {self.fragments}")

    @property
    def period(self) -> int:
        """Trainer steps between two sync points (of consecutive fragments)."""
        return self.inner_steps // self.fragments

    def fragment_at(self, t: int) -> int:
        """The fragment synced after trainer step t (1-based), or -1 when t is no sync point."""
        if t % self.period:
            return -1
        return (t // self.period - 1) % self.fragments


def fragment_of(name: str, fragments: int) -> int:
    """A parameter named ...layers.{i}.... is in fragment i mod F; every other one in fragment 0."""
    hit = _LAYER.search(name)
    return int(hit.group(1)) % fragments if hit else 0


class OuterState:
    """g and m per parameter name (fp32), and the mean in flight per fragment when overlapped."""

    def __init__(self, initial: dict[str, torch.Tensor], spec: Diloco) -> None:
        self.spec = spec
        self.g = {n: p.detach().float().clone() for n, p in initial.items()}
        self.m = {n: torch.zeros_like(p) for n, p in self.g.items()}
        self.in_flight: dict[int, dict[str, torch.Tensor]] = {}
        self.starts: list[dict[str, torch.Tensor]] = []
        """Overlapped: where each island's current round began, per name (made at the first sync)."""

    def names(self, fragment: int) -> list[str]:
        return [n for n in self.g if fragment_of(n, self.spec.fragments) == fragment]

    def _apply(self, name: str, mean: torch.Tensor) -> None:
        mu, lr = self.spec.outer_momentum, self.spec.outer_lr
        self.m[name] = mu * self.m[name] + mean
        self.g[name] = self.g[name] - lr * (mean + mu * self.m[name])

    @torch.no_grad()
    def sync(self, fragment: int, islands: Sequence[dict[str, torch.Tensor]]) -> None:
        """The outer step of `fragment`; islands[k][name] is island k's parameter, set to g in place."""
        k = len(islands)
        names = self.names(fragment)
        if self.spec.overlap:
            self._overlapped(fragment, names, islands, launch=True)
            return
        means = {}
        for n in names:
            total = torch.zeros_like(self.g[n])
            for island in islands:
                total = total + (self.g[n] - island[n].detach().float())
            means[n] = total / k
        for n in names:
            self._apply(n, means[n])
        for island in islands:
            for n in names:
                island[n].copy_(self.g[n])

    def _overlapped(
        self, fragment: int, names: list[str], islands: Sequence[dict[str, torch.Tensor]], launch: bool
    ) -> None:
        if not self.starts:
            self.starts = [{n: g.clone() for n, g in self.g.items()} for _ in islands]
        deltas = [
            {n: self.starts[k][n] - island[n].detach().float() for n in names} for k, island in enumerate(islands)
        ]
        previous = self.in_flight.pop(fragment, None)
        if previous is not None:
            for n in names:
                self._apply(n, previous[n])
        for k, island in enumerate(islands):
            for n in names:
                self.starts[k][n] = self.g[n] - deltas[k][n]
                island[n].copy_(self.starts[k][n])
        if launch:
            self.in_flight[fragment] = {n: sum(d[n] for d in deltas) / len(islands) for n in names}

    @torch.no_grad()
    def flush(self, islands: Sequence[dict[str, torch.Tensor]]) -> None:
        """Overlapped, after the last step: every mean in flight applied, each island's progress re-based."""
        for fragment in sorted(self.in_flight):
            self._overlapped(fragment, self.names(fragment), islands, launch=False)


@dataclass
class Reference:
    losses: list[list[float]]
    """losses[k][s]: island k's mean loss at trainer step s + 1."""
    grad_norms: list[list[float]]
    fragments: list[int]
    """The fragment synced after each trainer step, -1 where none."""
    params: list[dict[str, torch.Tensor]] = field(default_factory=list)
    """Island k's parameters after the last step (and its outer step, if any), by name."""


def island_micro_batches(
    cfg: Config, spec: Diloco, dp: int, n_sequences: int, island: int, step: int
) -> list[list[int]]:
    """The sequence indices of island `island` at optimizer step `step` (0-based): its data ranks'
    micro-batches, rank after rank."""
    t = cfg.training
    out: list[list[int]] = []
    for j in range(dp):
        rank = island * dp + j
        sampler = BatchSampler(n_sequences, t.global_batch, t.micro_batch, rank, spec.islands * dp, t.seed)
        out.extend([int(i) for i in row] for row in sampler.rank_indices(step))
    return out


def island_sequences(cfg: Config, spec: Diloco, dp: int, n_sequences: int, island: int, step: int) -> list[int]:
    """The island's whole batch at `step`: the union of its data ranks' sequences."""
    return [i for row in island_micro_batches(cfg, spec, dp, n_sequences, island, step) for i in row]


def simulate(cfg: Config, spec: Diloco, dp: int = 1) -> Reference:
    """Train K islands of `dp` data ranks each for cfg.training.steps, one after another, per the contract."""
    t, K = cfg.training, spec.islands
    if t.global_batch % K:
        raise ValueError(f"global_batch {t.global_batch} does not split over {K} islands")
    dataset = build_dataset(cfg.data, build_tokenizer(cfg.data.tokenizer), t.seq_len, t.seed)
    models = [build_model(cfg.model, seed=t.seed) for _ in range(K)]
    params = [dict(model.named_parameters()) for model in models]
    optims = [AdamW(list(p.items()), cfg.optimizer, no_decay={n for n, v in p.items() if v.ndim < 2}) for p in params]
    outer = OuterState(params[0], spec)
    island_tokens = (t.global_batch // K) * t.seq_len
    ref = Reference([[] for _ in range(K)], [[] for _ in range(K)], [])
    for s in range(t.steps):
        lr = lr_at(s, t)
        for k in range(K):
            # the gradient of the island's mean loss, summed over micro-batches in the order the
            # island's ranks see them (the run's rounding, nearly: AdamW magnifies the last bits of
            # gradients near zero to ~1e-5 in the weights after a few steps)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for idx in island_micro_batches(cfg, spec, dp, len(dataset), k, s):
                tokens, targets = dataset.batch(np.asarray(idx))
                loss = cross_entropy_sum(models[k](tokens, torch.arange(tokens.shape[1])), targets)
                (loss / island_tokens).backward()
                loss_sum += loss.detach().double()
            grads = [_grad(p) for p in params[k].values()]
            norm = float(torch.linalg.vector_norm(torch.stack([_norm64(g) for g in grads])))
            if t.grad_clip and norm > t.grad_clip:
                for g in grads:
                    g.mul_(t.grad_clip / (norm + 1e-6))
            optims[k].step(grads, lr)
            for p in params[k].values():
                p.grad = None
            ref.losses[k].append(float(loss_sum) / island_tokens)
            ref.grad_norms[k].append(norm)
        fragment = spec.fragment_at(s + 1) if spec.outer else -1
        ref.fragments.append(fragment)
        if fragment >= 0:
            outer.sync(fragment, params)
    if spec.outer and spec.overlap:
        outer.flush(params)
    ref.params = [{n: p.detach().clone() for n, p in island.items()} for island in params]
    return ref


def _grad(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        raise AssertionError("a parameter got no gradient")
    return p.grad


def _norm64(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(g, dtype=torch.float64)
