"""A mixture-of-experts feed-forward for one device: router, routed SwiGLU experts, shared experts,
load balancing and capacity. Parallelism stays outside: expert parallelism replaces `dispatch`.

Names follow Hugging Face's DeepseekV3 layout, so that export stays a renaming:
    mlp.gate.weight                          (n_experts, dim) router
    mlp.gate.e_score_correction_bias         (n_experts,) the balancing bias (a saved buffer)
    mlp.experts.{j}.{gate,up,down}_proj.weight
    mlp.shared_experts.{gate,up,down}_proj.weight   one SwiGLU n_shared_experts x expert_ffn_dim wide

Routing, per token, in fp32: scores = softmax or sigmoid of the router logits; the top_k experts are
chosen by scores + bias (the bias only ever chooses: DeepSeek-V3's auxiliary-loss-free balancing) and
weighted by their scores renormalised to sum to 1.

Capacity (capacity_factor > 0): the group is one sequence, so that every layout (and the single
device) applies the same rule. Of a sequence's s*k assignments, expert e keeps the first
ceil(s*k/E * capacity_factor) in token order; the rest add nothing (the token passes on through the
residual).

Balancing losses, both computed per sequence and scaled to the step's objective by `loss_scale`
(1 / sequences in the global batch for the auxiliary loss, 1 / tokens for the z-loss, set by the build
path), so they add up over micro-batches and ranks like the cross-entropy does:
    auxiliary (Switch / GShard, DeepSeek-V3's sequence-wise form): E * sum_i f_i * P_i, with
        f_i = (assignments to expert i) / (s*k) and P_i = mean over the sequence's tokens of the
        normalised score of expert i; f is a count, so only P carries gradient. The loss is linear
        in P, so a rank holding part of each sequence (context parallelism) adds its tokens' share
        of P_i weighted by the whole sequence's f_i, which `sequence_sum` (a sum over the ranks
        holding the other parts, set by the build path) gives it; the shares add up to the loss;
    z-loss (ST-MoE): logsumexp(router logits)^2 per token.
They enter backward through `_WithAuxiliaryLoss`, so no runner or loss function needs to know them;
their values are kept in `stats` for the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from meshtrain.config import ModelConfig


class Expert(nn.Module):
    """One SwiGLU feed-forward (the dense MLP's shape, `width` wide)."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, width, bias=False)
        self.up_proj = nn.Linear(dim, width, bias=False)
        self.down_proj = nn.Linear(width, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    e_score_correction_bias: torch.Tensor

    def __init__(self, dim: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))


@dataclass
class RoutingStats:
    """What the layer routed since the last reset (forward passes outside backward only, so that a
    recomputed forward is not counted twice)."""

    n_experts: int
    counts: torch.Tensor | None = None
    """Assignments per expert (before capacity), summed over tokens; float64, on the layer's device."""
    dropped: float = 0.0
    assignments: float = 0.0
    aux_loss: float = 0.0
    z_loss: float = 0.0
    paused: bool = False
    """Set while the model evaluates: those forwards are not the training step's routing."""

    def add(self, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx.flatten(), minlength=self.n_experts).to(torch.float64)
        self.counts = counts if self.counts is None else self.counts + counts

    def reset(self) -> None:
        self.counts = None
        self.dropped = self.assignments = self.aux_loss = self.z_loss = 0.0


Dispatch = Callable[[torch.Tensor, torch.Tensor, nn.ModuleDict], torch.Tensor]
"""(tokens sorted by expert, tokens per expert, the experts) -> their outputs, in the same order."""


def _whole_sequences(counts: torch.Tensor) -> torch.Tensor:
    return counts  # one device holds every token of its sequences


def grouped_experts(x: torch.Tensor, counts: torch.Tensor, experts: nn.ModuleDict) -> torch.Tensor:
    """Run each expert on its contiguous run of `x`: torch._grouped_mm when the shapes allow it (its
    operands need 16-byte aligned strides), else one matmul per expert. Zero-token experts are fine."""
    mods = [cast(Expert, experts[k]) for k in sorted(experts, key=int)]
    dim, width = mods[0].gate_proj.in_features, mods[0].gate_proj.out_features
    aligned = all(n * x.element_size() % 16 == 0 for n in (dim, width))
    if aligned and x.dtype in (torch.float32, torch.bfloat16):
        offs = torch.cumsum(counts, 0).to(torch.int32)

        def stacked(name: str) -> torch.Tensor:
            return torch.stack([getattr(m, name).weight for m in mods]).to(x.dtype).transpose(-2, -1)

        h = F.silu(torch._grouped_mm(x, stacked("gate_proj"), offs=offs))
        h = h * torch._grouped_mm(x, stacked("up_proj"), offs=offs)
        return torch._grouped_mm(h, stacked("down_proj"), offs=offs)
    return torch.cat([m(part) for m, part in zip(mods, x.split(counts.tolist()))])


class _WithAuxiliaryLoss(torch.autograd.Function):
    """Returns `out` unchanged; in backward, also sends gradient 1 into `aux`, adding it to the objective."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), dtype=torch.float32, device=grad.device)


@dataclass
class LossScale:
    """Set by the build path: what one sequence's auxiliary loss and one token's z-loss weigh in the step."""

    per_sequence: float = 1.0
    per_token: float = 1.0


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg.dim, cfg.n_experts)
        self.experts = nn.ModuleDict({str(j): Expert(cfg.dim, cfg.moe_ffn_dim) for j in range(cfg.n_experts)})
        self.shared_experts = Expert(cfg.dim, cfg.n_shared_experts * cfg.moe_ffn_dim) if cfg.n_shared_experts else None
        self.dispatch: Dispatch = grouped_experts
        self.loss_scale = LossScale()
        self.sequence_sum: Callable[[torch.Tensor], torch.Tensor] = _whole_sequences
        """Per-sequence counts (b, E) summed over the ranks that hold the rest of those sequences."""
        self.stats = RoutingStats(cfg.n_experts)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(expert ids (T, k), weights (T, k), normalised scores (T, E), logits (T, E)), all but the ids
        in fp32 (fp64 for an fp64 model) whatever the activations' dtype."""
        acc = torch.promote_types(flat.dtype, torch.float32)  # fp32, or fp64 when the model is
        with torch.autocast(flat.device.type, enabled=False):
            logits = F.linear(flat.to(acc), self.gate.weight.to(acc))
        if self.cfg.router_score == "softmax":
            scores = logits.softmax(-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
        choice = scores.detach()
        if self.cfg.load_balance == "bias":
            choice = choice + self.gate.e_score_correction_bias
        idx = choice.topk(self.cfg.top_k, dim=-1).indices
        weights = scores.gather(-1, idx)
        return idx, weights / weights.sum(-1, keepdim=True), probs, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        idx, weights, probs, logits = self.route(flat)
        keep = capacity_mask(idx, s, self.cfg.n_experts, self.cfg.capacity_factor)
        out = combine(flat, idx, weights, keep, self.experts, self.dispatch, self.cfg.n_experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        aux, z = self._balancing_losses(idx, probs, logits, b, s)
        self._count(idx, keep, aux, z)
        out = out.view(b, s, d)
        total = aux + z
        return _WithAuxiliaryLoss.apply(out, total) if total.requires_grad else out

    def _balancing_losses(
        self, idx: torch.Tensor, probs: torch.Tensor, logits: torch.Tensor, b: int, s: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(auxiliary loss, z-loss), each already scaled to the step's objective (module docstring)."""
        cfg, k, e = self.cfg, self.cfg.top_k, self.cfg.n_experts
        aux = z = torch.zeros((), dtype=torch.float32, device=logits.device)
        if cfg.load_balance == "aux_loss" and cfg.aux_loss_coef:
            counts = self.sequence_sum(F.one_hot(idx.view(b, s * k), e).sum(1).float())  # (b, E), no gradient
            assignments = counts.sum(1, keepdim=True)  # the whole sequence's length times k
            f, p = counts / assignments, probs.view(b, s, e).sum(1) * (k / assignments)
            aux = cfg.aux_loss_coef * e * (f * p).sum() * self.loss_scale.per_sequence
        if cfg.z_loss_coef:
            z = cfg.z_loss_coef * logits.logsumexp(-1).pow(2).sum() * self.loss_scale.per_token
        return aux, z

    @torch.no_grad()
    def _count(self, idx: torch.Tensor, keep: torch.Tensor, aux: torch.Tensor, z: torch.Tensor) -> None:
        st = self.stats
        if st.paused or torch._C._current_graph_task_id() != -1:  # evaluating, or recomputing in backward
            return
        st.add(idx)
        st.assignments += idx.numel()
        st.dropped += float((~keep).sum())
        st.aux_loss += float(aux.detach())
        st.z_loss += float(z.detach())


def moe_layers(parts: list[nn.Module]) -> dict[str, MoE]:
    """Every MoE layer of a rank's model parts, by its name in the model (`model.layers.3.mlp`)."""
    return {name: m for part in parts for name, m in part.named_modules() if isinstance(m, MoE)}


def capacity_mask(idx: torch.Tensor, seq_len: int, n_experts: int, factor: float) -> torch.Tensor:
    """(T, k) bool: which assignments their expert takes (module docstring: per sequence, first come)."""
    if factor <= 0:
        return torch.ones_like(idx, dtype=torch.bool)
    t, k = idx.shape
    cap = math.ceil(seq_len * k / n_experts * factor)
    seq = torch.arange(t, device=idx.device).div(seq_len, rounding_mode="floor").repeat_interleave(k)
    key = seq * n_experts + idx.flatten()  # token-major order: the sort keeps it within a key
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    first = torch.searchsorted(sorted_key, sorted_key, side="left")
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=idx.device) - first
    return (rank < cap).view(t, k)


def combine(
    flat: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    keep: torch.Tensor,
    experts: nn.ModuleDict,
    dispatch: Dispatch,
    n_experts: int,
) -> torch.Tensor:
    """Sort the kept assignments by expert (stable: token order within an expert), run the experts,
    weight their outputs by the router and add them up per token."""
    t, k = idx.shape
    token = torch.arange(t, device=flat.device).repeat_interleave(k)[keep.flatten()]
    expert, weight = idx.flatten()[keep.flatten()], weights.flatten()[keep.flatten()]
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=n_experts)
    y = dispatch(flat[token[order]], counts, experts)
    y = (y.to(weight.dtype) * weight[order].unsqueeze(-1)).to(flat.dtype)  # weighted in the router's precision
    return torch.zeros_like(flat).index_add(0, token[order], y)
