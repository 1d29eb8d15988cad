"""The contract between the training loop and a data-parallel strategy (plain DP, ZeRO 1/2/3).

The trainer never touches `param.grad` or the optimizer's tensors directly: it asks the engine which
tensors the optimizer updates (whole parameters for plain DP, fp32 flat shards under ZeRO), runs the
optimizer on them, and lets the engine bring the model's parameters up to date afterwards.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful


class GradEngine(Protocol):
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

    shard_group: dist.ProcessGroup | None
    """The ranks among which optim_grads are disjoint pieces of one gradient (ZeRO's dp_shard group):
    a norm sums their squares over it. None when every rank holds whole gradients."""

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

    def optim_state_dict(self, optim_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The optimizer's state dict as checkpoints hold it: keyed by parameter name whatever the
        sharding (ZeRO wraps its per-shard state in a Stateful that gathers and scatters it)."""
        ...

    def num_params(self) -> int:
        """Parameters of the whole model (unsharded, tied weights once)."""
        ...

    collective_forward: bool
    """True when the model's forward runs collectives (ZeRO-3 gathers): every rank must call it together."""

    def step_metrics(self) -> dict[str, float]:
        """Strategy-specific figures for this step's metrics.jsonl record (e.g. ZeRO-3's gathered peak)."""
        ...

    def describe(self) -> str:
        """One line for the start-of-training summary: the strategy, its groups and its per-rank state."""
        ...
