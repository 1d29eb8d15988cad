"""Backward split into B (gradient for the input) and W (gradient for the weights), for zero-bubble
pipeline schedules.

A layer takes part through a one-method protocol, `DefersWeightGrads.defer_weight_grads(queue)`:
from then on, a backward run inside a B (while `queue.target` is a list) returns only the input
gradient and queues a closure that computes the weight gradient; W runs the queue later. Outside a
B the layer behaves as usual. Tensor-parallel layers implement the protocol themselves. A plain
bias-free `nn.Linear` cannot, so `split_weight_grads` swaps it for a `DeferredLinear` holding the
same weight Parameter: the name, the value and every engine's hold on the Parameter stay the same.
Other parameters (norms, embedding) are small and get their gradients in B as usual.

Under sequence parallelism the column layers keep only the input's sequence shard, so their W
re-gathers it: every tp rank of a stage runs the same actions, so those collectives line up.

A W closure reads the saved input and output gradient, never the weight (dW = dY^T X; only B's
dX = dY W needs it). A gradient engine that must know when a deferred gradient lands (ZeRO-3, which
reduces a unit once its W has run) subscribes with `WeightGradQueue.watch`: it hears of each closure
when B queues it and again when W has added it to `.grad`, where no autograd hook sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


class WeightGradWatcher(Protocol):
    def deferred(self, weight: nn.Parameter) -> None:
        """A B queued `weight`'s gradient for W (its autograd hook still fires, with no gradient)."""
        ...

    def landed(self, weight: nn.Parameter) -> None:
        """W has added the queued gradient to `weight.grad`."""
        ...


class WeightGradQueue:
    """Where deferred weight gradients go; `target` None means compute them at once."""

    def __init__(self) -> None:
        self.target: list[Callable[[], None]] | None = None
        self.watchers: list[WeightGradWatcher] = []

    def watch(self, watcher: WeightGradWatcher) -> None:
        self.watchers.append(watcher)


@runtime_checkable
class DefersWeightGrads(Protocol):
    def defer_weight_grads(self, queue: WeightGradQueue) -> None:
        """From now on, put this layer's weight gradients on `queue` during a B."""
        ...


def _accumulate(weight: nn.Parameter, grad: torch.Tensor) -> None:
    if weight.grad is None:
        weight.grad = grad.to(weight.dtype)
    else:
        weight.grad.add_(grad)


def defer_weight_grad(queue: WeightGradQueue, weight: nn.Parameter, compute: Callable[[], torch.Tensor]) -> None:
    """Add compute() to weight.grad now (outside a B), or queue that for W (inside one)."""
    defer_weight_grads_of(queue, [weight], lambda: [compute()])


def defer_weight_grads_of(
    queue: WeightGradQueue, weights: Sequence[nn.Parameter], compute: Callable[[], Sequence[torch.Tensor | None]]
) -> None:
    """defer_weight_grad for several weights whose gradients one computation yields (async tensor
    parallelism's ring gives a region's column weights theirs together); a None grad adds nothing."""

    def weight_grad() -> None:
        with torch.no_grad():  # W runs outside backward, where grad mode is on again
            for weight, grad in zip(weights, compute()):
                if grad is not None:
                    _accumulate(weight, grad)

    if queue.target is None:
        weight_grad()  # inside backward (a BW): the weight's own autograd hook fires after this
        return

    def in_w() -> None:
        weight_grad()
        for watcher in queue.watchers:
            for weight in weights:
                watcher.landed(weight)

    queue.target.append(in_w)
    for watcher in queue.watchers:  # per weight: ZeRO-3 counts what each unit's W still owes it
        for weight in weights:
            watcher.deferred(weight)


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, queue: WeightGradQueue) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # mirror autocast: compute in its dtype
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dtype), weight.to(dtype)
        else:
            w = weight
        ctx.save_for_backward(x, w)
        ctx.weight, ctx.queue = weight, queue
        with torch.autocast(x.device.type, enabled=False):
            return x @ w.t()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, w = ctx.saved_tensors
        grad_out = grad_out.to(w.dtype)
        grad_x = grad_out @ w
        defer_weight_grad(ctx.queue, ctx.weight, lambda: grad_out.flatten(0, -2).t() @ x.flatten(0, -2))
        return grad_x, None, None


def split_linear(x: torch.Tensor, weight: nn.Parameter, queue: WeightGradQueue) -> torch.Tensor:
    """x @ weight.T whose weight gradient waits for W when computed inside a B."""
    return _SplitLinear.apply(x, weight, queue)


class DeferredLinear(nn.Module):
    """A bias-free linear layer whose weight gradient can wait for W; it takes over an nn.Linear's
    weight Parameter itself (not a copy)."""

    def __init__(self, weight: nn.Parameter, queue: WeightGradQueue) -> None:
        super().__init__()
        self.weight = weight
        self.queue = queue

    def defer_weight_grads(self, queue: WeightGradQueue) -> None:
        self.queue = queue

    # its backward queues Python closures for a later W: a compiled graph would bake that in
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_linear(x, self.weight, self.queue)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, bias=False"


def split_weight_grads(module: nn.Module, queue: WeightGradQueue) -> int:
    """Let every layer inside `module` defer its weight gradients to `queue`: layers implementing
    DefersWeightGrads are told so, bias-free nn.Linear are swapped for DeferredLinear. Returns how
    many layers now split their backward."""
    count = 0
    for name, layer in list(module.named_modules()):
        if isinstance(layer, DefersWeightGrads):
            layer.defer_weight_grads(queue)
            count += 1
        elif isinstance(layer, nn.Linear) and layer.bias is None and name:  # a swap needs a parent
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, DeferredLinear(layer.weight, queue))
            count += 1
    return count
