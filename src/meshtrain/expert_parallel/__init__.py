"""Expert parallelism: each rank of an ep group holds n_experts/ep of every MoE layer's experts,
and tokens travel to them by all-to-all.

- dispatch.py  the all-to-all dispatch and combine, differentiable, with unequal splits
- engine.py    the gradient norm over the ep group (experts differ across it)
- comm.py      the count and row exchanges, counted and logged

`apply_expert_parallel` keeps this rank's experts (by their global names, so checkpoints cross ep
degrees) and gives every MoE layer the all-to-all dispatch. Expert gradients are summed over the
expert-data-parallel group (the ranks holding the same experts), dense ones over dp x cp: the data
-parallel engine is told which parameters are experts' (meshtrain.build). ep borrows the dp_shard x
cp ranks (meshtrain.degrees.Degrees.expert_groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from meshtrain.accounting import Recorder
from meshtrain.expert_parallel.dispatch import AllToAllDispatch, ExpertGroup
from meshtrain.expert_parallel.engine import ExpertParallelEngine
from meshtrain.model.moe import moe_layers

__all__ = ["ExpertParallel", "ExpertParallelEngine", "apply_expert_parallel"]


@dataclass(frozen=True)
class ExpertParallel:
    group: dist.ProcessGroup
    """The ep group: its ranks hold different experts and exchange tokens."""
    expert_params: set[str]
    """Names of this rank's expert parameters."""


def apply_expert_parallel(parts: list[nn.Module], group: dist.ProcessGroup, stats: Recorder) -> ExpertParallel:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    ep = ExpertGroup(group, size, stats)
    names: set[str] = set()
    for name, module in moe_layers(parts).items():
        local = module.cfg.n_experts // size
        keep = [str(j) for j in range(rank * local, (rank + 1) * local)]
        module.experts = nn.ModuleDict({k: module.experts[k] for k in keep})
        module.dispatch = AllToAllDispatch(ep)
        names |= {f"{name}.experts.{pname}" for pname, _ in module.experts.named_parameters()}
    return ExpertParallel(group, names)
