"""The collectives ZeRO needs, counted and logged by the communication layer (core/comm.py).

Flat units are padded so every rank's shard has the same size, which the single-tensor collectives
require; the padding is not traffic the strategy asks for, so each call records the bytes of the
*unpadded* unit (`real_bytes`). That keeps the counters equal to the theory (2 psi per step for
ZeRO 1/2, 3 psi for ZeRO 3, times (N-1)/N on the wire) whatever the remainder of psi / N.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshtrain.accounting import CommStats
from meshtrain.core import comm
from meshtrain.core.comm import TrackedWork


def reduce_scatter(
    out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, real_bytes: float
) -> TrackedWork:
    """Sum `inp` over the group and leave this rank's slice in `out` (which may alias that slice)."""
    return comm.reduce_scatter(out, inp, group, stats, payload=real_bytes, async_op=True)


def all_gather(
    out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, real_bytes: float
) -> TrackedWork:
    """Concatenate every rank's `inp` into `out` (`inp` may alias this rank's slice of `out`)."""
    return comm.all_gather(out, inp, group, stats, payload=real_bytes, async_op=True)


def all_reduce(buf: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, real_bytes: float) -> TrackedWork:
    """Sum a gradient shard over the replicas of HSDP; `real_bytes` is this rank's 1/N share of the unit."""
    return comm.all_reduce(buf, group, stats, payload=real_bytes, async_op=True)


def gather_uncounted(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats) -> None:
    """All-gather for checkpoints: not step traffic, so it is kept out of the per-step counters."""
    if group is None:
        out.copy_(inp)
    else:
        comm.all_gather(out, inp, group, stats, counted=False)
