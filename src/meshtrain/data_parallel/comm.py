"""The collective data parallelism needs, counted and logged by the communication layer (core/comm.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshtrain.accounting import CommStats
from meshtrain.core import comm
from meshtrain.core.comm import TrackedWork


def all_reduce_async(buf: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> TrackedWork:
    """Sum a gradient bucket over the data-parallel group, in flight."""
    return comm.all_reduce(buf, group, stats, async_op=True)
