"""The gradient norm under expert parallelism: dense gradients are the same on every rank of an ep
group, expert gradients are disjoint across it (each rank holds other experts), so the squares of
the latter are summed over the group and those of the former counted once. Under ZeRO the inner
engine's norm already sums over the shard group, which spans the ep group (meshtrain.zero.base)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshtrain.accounting import Recorder
from meshtrain.core import comm
from meshtrain.core.engine import EngineDecorator, GradEngine


class ExpertParallelEngine(EngineDecorator):
    def __init__(self, inner: GradEngine, expert_params: set[str], group: dist.ProcessGroup, stats: Recorder) -> None:
        super().__init__(inner)
        self.expert_params, self.group, self.stats = expert_params, group, stats

    @property
    def collective_forward(self) -> bool:
        return True  # every MoE layer's forward exchanges tokens over the ep group

    def describe(self) -> str:
        return (
            f"{self.inner.describe()}; experts split over {dist.get_world_size(self.group)} ranks (all-to-all dispatch)"
        )

    def grad_norm(self) -> torch.Tensor:
        if self.inner.shard_group is not None:
            return self.inner.grad_norm()
        dense = torch.zeros((), dtype=torch.float64)
        experts = torch.zeros((), dtype=torch.float64)
        for (name, _), grad in zip(self.inner.optim_params(), self.inner.optim_grads()):
            sq = torch.linalg.vector_norm(grad, dtype=torch.float64).square().cpu()
            if name in self.expert_params:
                experts += sq
            else:
                dense += sq
        comm.all_reduce(experts, self.group, self.stats, counted=False)  # bookkeeping, like the loss
        return (dense + experts).sqrt()
