"""The collectives ZeRO needs, each one counted in CommStats.

Flat units are padded so every rank's shard has the same size, which the single-tensor collectives
require; the padding is not traffic the strategy asks for, so each call records the bytes of the
*unpadded* unit (`real_bytes`). That keeps the counters equal to the theory (2 psi per step for
ZeRO 1/2, 3 psi for ZeRO 3, times (N-1)/N on the wire) whatever the remainder of psi / N.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshtrain.accounting import CommStats


def reduce_scatter(
    out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, real_bytes: float
) -> dist.Work:
    """Sum `inp` over the group and leave this rank's slice in `out` (which may alias that slice)."""
    stats.record("reduce_scatter", real_bytes, dist.get_world_size(group))
    return dist.reduce_scatter_single(out, inp, op=dist.ReduceOp.SUM, group=group, async_op=True)


def all_gather(
    out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, real_bytes: float
) -> dist.Work:
    """Concatenate every rank's `inp` into `out` (`inp` may alias this rank's slice of `out`)."""
    stats.record("all_gather", real_bytes, dist.get_world_size(group))
    return dist.all_gather_single(out, inp, group=group, async_op=True)


def all_reduce(buf: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, real_bytes: float) -> dist.Work:
    """Sum a gradient shard over the replicas of HSDP; `real_bytes` is this rank's 1/N share of the unit."""
    stats.record("all_reduce", real_bytes, dist.get_world_size(group))
    return dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True)


def gather_uncounted(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """All-gather for checkpoints: not step traffic, so it is kept out of the per-step counters."""
    if group is None:
        out.copy_(inp)
    else:
        dist.all_gather_single(out, inp, group=group)
