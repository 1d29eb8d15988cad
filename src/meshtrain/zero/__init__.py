"""ZeRO stages 1-3 over the dp_shard axis, replicated across dp_replicate (HSDP), with CPU offload.

- base.py     flat padded units, fp32 master and gradient shards, their reduction, checkpoint views
- stage12.py  ZeRO-1 and ZeRO-2: whole parameters, sharded optimizer state (and gradients)
- stage3.py   ZeRO-3: parameters gathered per unit just before use, prefetched, freed after; ZeRO++
              (quantized weight gathers, node-local secondary shards, hierarchical int4 gradients)
- comm.py     the counted collectives (reduce-scatter, all-gather, the replicas' all-reduce, ZeRO++'s)

The engine takes whatever parts this rank holds once the earlier steps of the build path have run
(meshtrain.build): with tensor parallelism their tp-local parameters (the dp_shard group is the
ranks of the same tp coordinate, so they shard identical shapes), with pipelining one part per stage
(the group is the ranks of the same stages). Under expert parallelism the experts' parameters are
flat units of their own, sharded over the ranks that hold the same experts (`ExpertShards`).
"""

from __future__ import annotations

import torch
from torch import nn

from meshtrain.accounting import CommStats
from meshtrain.core.weight_grads import WeightGradQueue
from meshtrain.zero.base import ExpertShards, FlatUnit, ShardGroups, ZeroBase
from meshtrain.zero.stage3 import Zero3, ZeroPP
from meshtrain.zero.stage12 import Zero12

__all__ = ["ExpertShards", "FlatUnit", "ShardGroups", "Zero3", "Zero12", "ZeroBase", "ZeroPP", "build_zero_engine"]


def build_zero_engine(
    parts: list[nn.Module],
    stage: int,
    groups: ShardGroups,
    stats: CommStats,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    bucket_bytes: int,
    offload: bool,
    prefetch: bool,
    deferred_weight_grads: WeightGradQueue | None,
    experts: ExpertShards | None = None,
    zeropp: ZeroPP | None = None,
) -> Zero3 | Zero12:
    """The engine for ZeRO `stage` (1-3). `param_dtype` is what ZeRO-3 gathers and computes in.
    `deferred_weight_grads`: the queue of a zero-bubble pipeline's W, which accumulates some weight
    gradients outside autograd, after backward, where no hook sees them: ZeRO-2 then reduces once, in
    finish(); ZeRO-3 watches the queue and reduces each unit once its W has run.
    `experts`: expert parallelism's parameters and the groups they shard over. `zeropp`: ZeRO++'s
    parts on ZeRO-3."""
    if stage == 3:
        return Zero3(
            parts,
            groups,
            stats,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            offload=offload,
            prefetch=prefetch,
            experts=experts,
            zeropp=zeropp,
            weight_grads=deferred_weight_grads,
        )
    return Zero12(
        parts,
        stage,
        groups,
        stats,
        bucket_bytes,
        reduce_dtype,
        offload,
        reduce_each_micro=deferred_weight_grads is None,
        experts=experts,
    )
