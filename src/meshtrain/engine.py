"""The contract between the training loop and a data-parallel strategy (plain DP, ZeRO 1/2/3).

The trainer never touches `param.grad` or the optimizer's tensors directly: it asks the engine which
tensors the optimizer updates (whole parameters for plain DP, fp32 flat shards under ZeRO), runs the
optimizer on them, and lets the engine bring the model's parameters up to date afterwards.
"""
from __future__ import annotations

from typing import Protocol

import torch


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

    def scale_grads(self, factor: float) -> None: ...

    def after_step(self) -> None:
        """After the optimizer step: propagate updated values to the model (e.g. ZeRO's all-gather)."""
        ...

    def zero_grad(self) -> None: ...

    def state_tensors(self) -> list[torch.Tensor]:
        """Parameter and gradient tensors this rank holds, for model-state accounting."""
        ...

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Model weights keyed by parameter name, as saved in checkpoints (tensors or DTensors)."""
        ...

    def num_params(self) -> int:
        """Parameters of the whole model (unsharded, tied weights once)."""
        ...
