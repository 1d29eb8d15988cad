"""The contract between the training loop and a gradient strategy (plain DP, ZeRO 1/2/3), and the
decorators that layer other parallelisms' changes on top of one.

The trainer never touches `param.grad` or the optimizer's tensors directly: it asks the engine which
tensors the optimizer updates (whole parameters for plain DP, fp32 flat shards under ZeRO), runs the
optimizer on them, and lets the engine bring the model's parameters up to date afterwards.

A parallelism that changes only part of the contract (tensor parallelism: the gradient norm and the
checkpoint shapes; pipelining: the norm over stages) wraps the engine in an `EngineDecorator` and
overrides just that part, so engines compose in the build path's order without knowing each other.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from meshtrain.accounting import Recorder
from meshtrain.core import comm


class GradEngine(Protocol):
    # Read-only properties, so that a class attribute, an instance attribute or a property all satisfy them.
    @property
    def shard_group(self) -> dist.ProcessGroup | None:
        """The ranks among which optim_grads are disjoint pieces of one gradient (ZeRO's dp_shard group):
        a norm sums their squares over it. None when every rank holds whole gradients."""
        ...

    @property
    def collective_forward(self) -> bool:
        """True when the model's forward runs collectives (ZeRO-3 gathers, TP): every rank must call it together."""
        ...

    def optim_params(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs the optimizer updates in place; names key the optimizer state."""
        ...

    def no_decay(self) -> set[str]:
        """Names among optim_params that get no weight decay (norm weights)."""
        ...

    def set_sync(self, sync: bool) -> None:
        """False on accumulation micro-steps before the last: no communication."""
        ...

    def finish(self) -> None:
        """After the last backward of a step: wait for (or run) the gradient reduction."""
        ...

    def optim_grads(self) -> list[torch.Tensor]:
        """Reduced gradients aligned with optim_params."""
        ...

    def grad_norm(self) -> torch.Tensor:
        """The true global L2 norm of the gradient, counted once per parameter element."""
        ...

    def scale_grads(self, factor: float) -> None: ...

    def after_step(self) -> None:
        """After the optimizer step: propagate updated values to the model (e.g. ZeRO's all-gather)."""
        ...

    def zero_grad(self) -> None: ...

    def state_tensors(self) -> list[torch.Tensor]:
        """Parameter and gradient tensors this rank holds, for model-state accounting."""
        ...

    def model_state_dict(self) -> dict[str, torch.Tensor] | Stateful:
        """Model weights keyed by parameter name, as saved in checkpoints: tensors loaded in place, or a
        DCP Stateful whose state_dict() gives them (ZeRO gathers its shards there, scatters them on load)."""
        ...

    def optim_state_dict(self, optim_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | Stateful:
        """The optimizer's state dict as checkpoints hold it: keyed by parameter name whatever the
        sharding (ZeRO wraps its per-shard state in a Stateful that gathers and scatters it)."""
        ...

    def num_params(self) -> int:
        """Parameters this rank's model parts hold, unsharded (tied weights once)."""
        ...

    def step_metrics(self) -> dict[str, float]:
        """Strategy-specific figures for this step's metrics record (e.g. ZeRO-3's gathered peak)."""
        ...

    def describe(self) -> str:
        """One line for the start-of-training summary: the strategy, its groups and its per-rank state."""
        ...


class EngineDecorator:
    """A GradEngine that forwards every member to `inner`; subclasses override what they change."""

    def __init__(self, inner: GradEngine) -> None:
        self.inner = inner

    @property
    def shard_group(self) -> dist.ProcessGroup | None:
        return self.inner.shard_group

    @property
    def collective_forward(self) -> bool:
        return self.inner.collective_forward

    def optim_params(self) -> list[tuple[str, torch.Tensor]]:
        return self.inner.optim_params()

    def no_decay(self) -> set[str]:
        return self.inner.no_decay()

    def set_sync(self, sync: bool) -> None:
        self.inner.set_sync(sync)

    def finish(self) -> None:
        self.inner.finish()

    def optim_grads(self) -> list[torch.Tensor]:
        return self.inner.optim_grads()

    def grad_norm(self) -> torch.Tensor:
        return self.inner.grad_norm()

    def scale_grads(self, factor: float) -> None:
        self.inner.scale_grads(factor)

    def after_step(self) -> None:
        self.inner.after_step()

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def state_tensors(self) -> list[torch.Tensor]:
        return self.inner.state_tensors()

    def model_state_dict(self) -> dict[str, torch.Tensor] | Stateful:
        return self.inner.model_state_dict()

    def optim_state_dict(self, optim_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | Stateful:
        return self.inner.optim_state_dict(optim_sd)

    def num_params(self) -> int:
        return self.inner.num_params()

    def step_metrics(self) -> dict[str, float]:
        return self.inner.step_metrics()

    def describe(self) -> str:
        return self.inner.describe()


class DisjointParts(EngineDecorator):
    """The model's parameters are split into disjoint sets across `group` (pipeline stages): the
    gradient norm adds the squared norms of every member's set."""

    def __init__(self, inner: GradEngine, group: dist.ProcessGroup, stats: Recorder) -> None:
        super().__init__(inner)
        self.group, self.stats = group, stats

    def grad_norm(self) -> torch.Tensor:
        sq = self.inner.grad_norm().double().square()
        comm.all_reduce(sq, self.group, self.stats, counted=False)
        return sq.sqrt()
