"""The collectives data parallelism needs, each one counted in CommStats."""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshtrain.accounting import CommStats


def all_reduce_async(buf: torch.Tensor, group: dist.ProcessGroup, stats: CommStats) -> dist.Work:
    stats.record("all_reduce", buf.numel() * buf.element_size(), dist.get_world_size(group))
    return dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True)
