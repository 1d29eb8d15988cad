"""Step runners: how one optimizer step's forward and backward passes run on this rank.

The trainer hands a runner the step's micro-batches and gets back this rank's summed token loss; it
never knows which runner it holds. `MicroStepRunner` is the plain loop over micro-batches; the
pipeline's executor (meshtrain.pipeline.executor) is the other implementation. Both follow the loss
convention of trainer.py: each micro-batch's summed token cross-entropy is scaled by 1 / (tokens in
the global batch) before backward, so gradients summed over micro-steps and ranks are exactly those
of the global mean loss, whatever the layout.

`evaluate` is the forward-only counterpart (the validation loss): the same forwards and loss
function under torch.no_grad(), returning the same summed token loss, so that `LossReduction`
adds it up over ranks exactly as it does the training loss; no gradient, no engine call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from meshtrain.accounting import Recorder
from meshtrain.core import comm
from meshtrain.core.engine import GradEngine

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits, targets) -> summed token cross-entropy (a vocab-parallel head brings its own)."""
BatchTransform = Callable[["Batch"], "Batch"]
"""What a rank does to each micro-batch before its forward (context parallelism: keep its shard)."""
Autocast = Callable[[], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class Batch:
    """One micro-batch: token ids and next-token targets, (b, s) each, and the rotary positions of
    the s tokens (None: 0..s-1, filled in by `with_positions`)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None


class StepHook(Protocol):
    """Work a model feature does once per optimizer step, outside the passes (MoE: sum the expert
    load over the ranks, move the balancing bias); the trainer calls every hook the build returns."""

    def start_step(self, step: int) -> int:
        """Before the first step, after any resume: the step training continues from (an island joining a
        live DiLoCo run adopts that run's); `step` unless the hook knows better."""
        ...

    def before_step(self, applied: bool) -> None:
        """Before the optimizer step; `applied` is False when the step is skipped (NaN, spike)."""
        ...

    def after_optimizer(self, step: int) -> bool:
        """After inner step `step`'s optimizer (applied or skipped), before the engine propagates it to the
        model: True when the hook changed the optimizer's parameters itself (DiLoCo's outer step)."""
        ...

    def metrics(self) -> dict[str, Any]:
        """Figures for this step's metrics record."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State the checkpoint keeps, tensors loaded in place."""
        ...

    def outside_training(self) -> contextlib.AbstractContextManager[None]:
        """Forwards run inside it (evaluation) are not the step's: the hook leaves its figures and state alone."""
        ...

    def describe(self) -> str:
        """A line for the start-of-training summary ('' when there is nothing to say)."""
        ...


def keep_batch(batch: Batch) -> Batch:
    return batch


def with_positions(batch: Batch, device: torch.device) -> Batch:
    """The batch on `device`, its positions explicit. The model is always given them: a rank may see
    a shard of the sequence (sequence or context parallelism) and cannot infer them from its input."""
    positions = batch.positions if batch.positions is not None else torch.arange(batch.tokens.shape[1])
    return replace(
        batch, tokens=batch.tokens.to(device), targets=batch.targets.to(device), positions=positions.to(device)
    )


class StepRunner(Protocol):
    scale: float
    """What each micro-batch's summed loss is multiplied by before backward: 1 / tokens in the global batch."""

    def run(self, batches: list[Batch]) -> torch.Tensor:
        """Every forward and backward of one optimizer step; this rank's summed token loss (float64)."""
        ...

    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        """Forward passes only, under torch.no_grad(): this rank's summed token loss (float64) of
        `batches`, one global batch's share; gradients, optimizer and the step's figures untouched."""
        ...

    def metrics(self) -> dict[str, float]:
        """The runner's own figures for the step just run (e.g. the pipeline's in-flight peak)."""
        ...

    def gradient_ready(self) -> bool:
        """Whether the step just run left a gradient for the optimizer (PipeDream-2BW's first step
        does not: its batch's gradient completes in the next step)."""
        ...

    def describe(self) -> str:
        """A clause for the start-of-training summary ('' when there is nothing to say)."""
        ...

    def close(self) -> None:
        """After the last step (e.g. write the pipeline trace)."""
        ...


@dataclass(frozen=True)
class ModelLoss:
    """A whole model's summed token loss on a micro-batch, as the micro-step runner computes it; also
    what `meshtrain eval` runs on one process."""

    loss_fn: LossFn
    device: torch.device
    autocast: Autocast = contextlib.nullcontext
    prepare: BatchTransform = keep_batch

    def __call__(self, model: nn.Module, raw: Batch) -> torch.Tensor:
        """Summed token loss, a float32 scalar (with autograd's graph when grad is on)."""
        batch = self.prepare(with_positions(raw, self.device))
        with self.autocast():
            logits = model(batch.tokens, batch.positions)
        return self.loss_fn(logits, batch.targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch]) -> torch.Tensor:
        """Summed token loss over `batches` (float64), forward only."""
        total = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            total += self(model, batch).double().cpu()
        return total


@dataclass
class MicroStepRunner:
    """Forward and backward of each micro-batch in turn, accumulating into the engine's gradients."""

    model: nn.Module
    engine: GradEngine
    loss_fn: LossFn
    scale: float
    """1 / tokens in the global batch."""
    device: torch.device
    autocast: Autocast = contextlib.nullcontext
    prepare: BatchTransform = keep_batch

    def run(self, batches: list[Batch]) -> torch.Tensor:
        loss_sum = torch.zeros((), dtype=torch.float64)
        for micro, raw in enumerate(batches):
            self.engine.set_sync(micro == len(batches) - 1)
            loss = self.model_loss(self.model, raw)
            (loss * self.scale).backward()
            loss_sum += loss.detach().double().cpu()
        return loss_sum

    @property
    def model_loss(self) -> ModelLoss:
        return ModelLoss(self.loss_fn, self.device, self.autocast, self.prepare)

    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        return self.model_loss.evaluate(self.model, batches)

    def metrics(self) -> dict[str, float]:
        return {}

    def gradient_ready(self) -> bool:
        return True

    def describe(self) -> str:
        return ""

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class LossReduction:
    """How ranks' summed losses add up to the global one: every rank that `counts` contributes its
    sum (ranks that computed no loss contribute zero; ranks holding a copy of another's loss, like
    tensor-parallel peers, do not count), summed over the whole world."""

    counts: bool
    stats: Recorder
    group: dist.ProcessGroup | None = None
    """The ranks whose losses add up: the world (None), or this DiLoCo island (islands train apart)."""
    size: int = 0
    """How many ranks that is (0: the world's size)."""

    def __call__(self, loss_sum: torch.Tensor) -> float:
        total = loss_sum.clone() if self.counts else torch.zeros_like(loss_sum)
        if dist.is_initialized() and (self.size or dist.get_world_size()) > 1:
            comm.all_reduce(total, self.group, self.stats, counted=False)
        return float(total)
