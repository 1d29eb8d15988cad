"""A single-process reference for PipeDream-2BW (issue 18), written from the paper's update rule and
not from meshtrain.pipeline: the single-device model, the same batches in the same order, and

    W(t+1) = W(t) - lr * grad f(W(t-1))        (the gradient is one weight version late)

in the trainer's step numbering: step k's loss is batch k's at the weights when step k begins,
W(k-1), batch 0 and batch 1 both at W(0); step 0 updates nothing; step k >= 1 applies batch k-1's
gradient (clipped to training.grad_clip over its whole norm) with meshtrain's AdamW at lr_at(k).
`delay=0` is the same loop applying batch k's own gradient at step k (1F1B's semantics), for
showing that the test tells the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from meshtrain.config import Config
from meshtrain.data import BatchSampler, build_dataset, build_tokenizer
from meshtrain.loss import cross_entropy_sum
from meshtrain.model import build_model
from meshtrain.optim import AdamW, lr_at


@dataclass
class Reference:
    losses: list[float]
    """The mean token loss of batch k, at the weights it ran with."""
    grad_norms: list[float]
    """The norm of the gradient applied at step k (0 where none is)."""
    params: dict[str, torch.Tensor]
    """The weights after the last step, by name."""


def simulate(cfg: Config, dp: int = 1, delay: int = 1, upto: int | None = None) -> Reference:
    """The run's first `upto` steps (all of training.steps by default), the lr schedule the whole run's.
    One thread: the tiny model is several times faster so on a shared CPU than with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _simulate(cfg, dp, delay, upto)
    finally:
        torch.set_num_threads(threads)


def _simulate(cfg: Config, dp: int, delay: int, upto: int | None) -> Reference:
    t = cfg.training
    if delay not in (0, 1):
        raise ValueError(f"delay is 0 or 1 (got {delay})")
    dataset = build_dataset(cfg.data, build_tokenizer(cfg.data.tokenizer), t.seq_len, t.seed)
    model = build_model(cfg.model, seed=t.seed)
    params = dict(model.named_parameters())
    optim = AdamW(list(params.items()), cfg.optimizer, no_decay={n for n, p in params.items() if p.ndim < 2})
    tokens_per_step = t.global_batch * t.seq_len
    ref = Reference([], [], {})
    late: list[torch.Tensor] | None = None  # the gradient waiting one version
    for k in range(t.steps if upto is None else upto):
        loss_sum = 0.0
        for rank in range(dp):
            sampler = BatchSampler(len(dataset), t.global_batch, t.micro_batch, rank, dp, t.seed)
            for idx in sampler.rank_indices(k):
                x, y = dataset.batch(np.asarray(idx))
                loss = cross_entropy_sum(model(x, torch.arange(x.shape[1])), y)
                (loss / tokens_per_step).backward()
                loss_sum += float(loss.detach().double())
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params.values()]
        for p in params.values():
            p.grad = None
        ref.losses.append(loss_sum / tokens_per_step)
        apply = grads if delay == 0 else late
        late = grads
        if apply is None:
            ref.grad_norms.append(0.0)
            continue
        norm = float(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in apply]))
        )
        ref.grad_norms.append(norm)
        if t.grad_clip and norm > t.grad_clip:
            apply = [g * (t.grad_clip / (norm + 1e-6)) for g in apply]
        optim.step(apply, lr_at(k, t))
    ref.params = {n: p.detach().clone() for n, p in params.items()}
    return ref
