"""ZeRO stages 1-3 over the dp_shard axis, replicated across dp_replicate (HSDP), with CPU offload.

`model` is whatever this rank holds after the earlier steps of parallelize(): with tensor
parallelism its tp-local parameters (the dp_shard group is the ranks of the same tp coordinate, so
they shard identical shapes), with pipelining its stages (StageChunks; the group is the ranks of the
same stage).
"""
from __future__ import annotations

import torch
from torch import nn

from meshtrain.accounting import CommStats
from meshtrain.config import ParallelConfig
from meshtrain.pipeline.schedules import splits_backward
from meshtrain.topology import Topology
from meshtrain.zero.base import ShardGroups, ZeroBase
from meshtrain.zero.stage3 import Zero3
from meshtrain.zero.stage12 import Zero12

__all__ = ["ShardGroups", "Zero12", "Zero3", "ZeroBase", "build_zero_engine"]


def build_zero_engine(model: nn.Module, topo: Topology, p: ParallelConfig, stats: CommStats,
                      param_dtype: torch.dtype, reduce_dtype: torch.dtype) -> ZeroBase:
    """The engine for p.zero_stage (1-3); `param_dtype` is what ZeRO-3 gathers and computes in."""
    groups = ShardGroups(topo.group("dp_shard"), topo.group("dp_replicate"))
    if p.zero_stage == 3:
        return Zero3(model, groups, stats, param_dtype=param_dtype, reduce_dtype=reduce_dtype, offload=p.offload,
                     prefetch=p.prefetch)
    deferred_weight_grads = p.pp > 1 and splits_backward(p.pp_schedule)
    return Zero12(model, p.zero_stage, groups, stats, int(p.bucket_mb * 2**20), reduce_dtype, p.offload,
                  reduce_each_micro=not deferred_weight_grads)
