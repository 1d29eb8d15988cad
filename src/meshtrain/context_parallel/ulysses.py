"""Ulysses (DeepSpeed's all-to-all sequence parallelism): trade the sequence shard for a head shard.

Before attention an all-to-all turns this rank's (b, h, s/cp, d) queries, keys and values into
(b, h/cp, s, d): every rank then holds the whole (contiguously sharded) sequence for h/cp of the
heads, attends causally as on one device, and a fourth all-to-all turns the output back. Heads and
kv heads must divide by cp (after tensor parallelism has split them by tp); the kv head groups of
grouped-query attention stay aligned with their query heads. Backward is the same exchanges
reversed. Per layer and microbatch: 4 all-to-alls forward and 4 backward, each of the rank's tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from meshtrain.accounting import Recorder
from meshtrain.context_parallel.comm import all_to_all_dim0


@dataclass(frozen=True)
class Ulysses:
    group: dist.ProcessGroup
    size: int
    stats: Recorder


def seq_to_heads(x: torch.Tensor, u: Ulysses) -> torch.Tensor:
    """(b, h, s/cp, d) on each rank -> (b, h/cp, s, d): head group j goes to rank j."""
    b, h, s, d = x.shape
    chunks = x.view(b, u.size, h // u.size, s, d).transpose(0, 1)
    got = all_to_all_dim0(chunks, u.group, u.stats)  # rank j's sequence chunk of my heads, j in order
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // u.size, u.size * s, d)


def heads_to_seq(x: torch.Tensor, u: Ulysses) -> torch.Tensor:
    """The inverse: (b, h/cp, s, d) -> (b, h, s/cp, d)."""
    b, hh, s, d = x.shape
    chunks = x.view(b, hh, u.size, s // u.size, d).permute(2, 0, 1, 3, 4)
    got = all_to_all_dim0(chunks, u.group, u.stats)  # my sequence chunk of rank j's heads
    # laid out (b, s, h, d) in memory, so that the o_proj input is a view, not one more copy
    seq = got.permute(1, 3, 0, 2, 4).reshape(b, s // u.size, u.size * hh, d)
    return seq.transpose(1, 2)


class _AllToAll(torch.autograd.Function):
    """seq_to_heads (to_heads) or heads_to_seq; the gradient takes the other way back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, u: Ulysses, to_heads: bool) -> torch.Tensor:
        ctx.u, ctx.to_heads = u, to_heads
        return seq_to_heads(x, u) if to_heads else heads_to_seq(x, u)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return (heads_to_seq(grad, ctx.u) if ctx.to_heads else seq_to_heads(grad, ctx.u)), None, None


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: Ulysses) -> torch.Tensor:
    q, k, v = (_AllToAll.apply(t, u, True) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return _AllToAll.apply(out, u, False)
