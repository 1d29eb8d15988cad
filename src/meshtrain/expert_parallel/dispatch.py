"""Expert-parallel dispatch: this rank's token rows go to the ranks that hold their experts, and
the experts' outputs come back.

The MoE layer hands `dispatch` its assignments sorted by global expert id, with the count per
expert (meshtrain.model.moe.combine). Per MoE layer and micro-batch:
  1. all-to-all of the counts, viewed (ep, E/ep): each rank learns how many rows it will get from
     each rank for each of its experts;
  2. all-to-all of the rows with those unequal splits;
  3. reorder the received rows from source-major to expert-major, run the local experts (grouped
     matmuls), and undo the reorder;
  4. the reverse all-to-all brings every row back to its token's rank, in the order it left.
Everything but the counts is differentiable: the backward of an exchange is the exchange reversed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from meshtrain.accounting import Recorder
from meshtrain.expert_parallel.comm import exchange_counts, exchange_rows
from meshtrain.model.moe import grouped_experts


@dataclass(frozen=True)
class ExpertGroup:
    group: dist.ProcessGroup
    size: int
    stats: Recorder


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, ep: ExpertGroup, send: list[int], recv: list[int], own_out: bool
    ) -> torch.Tensor:
        ctx.ep, ctx.send, ctx.recv, ctx.own_out = ep, send, recv, own_out
        return exchange_rows(x, send, recv, ep.group, ep.stats, own_out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        back = exchange_rows(grad, ctx.recv, ctx.send, ctx.ep.group, ctx.ep.stats, not ctx.own_out)
        return back, None, None, None, None


def _expert_major(recv_counts: torch.Tensor) -> torch.Tensor:
    """The permutation from source-major (rows from rank 0 for each of my experts, then rank 1, ...)
    to expert-major (all rows for my first expert, from every rank in order, then the next)."""
    ep, local = recv_counts.shape
    starts = torch.cumsum(recv_counts.flatten(), 0) - recv_counts.flatten()
    pieces = [
        torch.arange(int(starts[src * local + e]), int(starts[src * local + e] + recv_counts[src, e]))
        for e in range(local)
        for src in range(ep)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class AllToAllDispatch:
    """A MoE layer's `dispatch` under expert parallelism (the module docstring)."""

    ep: ExpertGroup

    def __call__(self, x: torch.Tensor, counts: torch.Tensor, experts: nn.ModuleDict) -> torch.Tensor:
        per_rank = counts.to(torch.int64).view(self.ep.size, -1)
        recv_counts = exchange_counts(per_rank, self.ep.group, self.ep.stats)
        send, recv = per_rank.sum(1).tolist(), recv_counts.sum(1).tolist()
        rows = _Exchange.apply(x, self.ep, send, recv, True)
        order = _expert_major(recv_counts).to(x.device)
        y = grouped_experts(rows[order], recv_counts.sum(0), experts)
        back = torch.empty_like(y).index_copy(0, order, y)  # source-major again
        return _Exchange.apply(back, self.ep, recv, send, False)
