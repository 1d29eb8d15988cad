"""Backward split into B (gradient for the input) and W (gradient for the weights), for zero-bubble
schedules.

Every nn.Linear of a stage is routed through `_SplitLinear`. In B its backward returns only the
input gradient and, instead of the weight gradient, queues a closure holding (input, grad_output);
W runs the queue later. Outside a B (whole backward, BW) it behaves as a plain linear layer. The
other parameters (norms, embedding) are small and get their gradients in B as usual.

Tensor-parallel layers are not nn.Linear: they take the queue (`weight_grad_queue`) and defer their
local matmul's weight gradient the same way. Under sequence parallelism the column layers keep only
the input's sequence shard, so their W re-gathers it: every tp rank of a stage runs the same
actions, so those collectives line up across the tp group.
"""
from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn


class WeightGradQueue:
    """Where `_SplitLinear` puts deferred weight gradients; None means compute them at once."""

    def __init__(self) -> None:
        self.target: list[Callable[[], None]] | None = None


def _accumulate(weight: nn.Parameter, grad: torch.Tensor) -> None:
    if weight.grad is None:
        weight.grad = grad.to(weight.dtype)
    else:
        weight.grad.add_(grad)


def defer_weight_grad(queue: WeightGradQueue, weight: nn.Parameter, compute: Callable[[], torch.Tensor]) -> None:
    """Add compute() to weight.grad now (outside a B), or queue that for W (inside one)."""
    def weight_grad() -> None:
        with torch.no_grad():  # W runs outside backward, where grad mode is on again
            _accumulate(weight, compute())

    if queue.target is None:
        weight_grad()
    else:
        queue.target.append(weight_grad)


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, queue: WeightGradQueue) -> torch.Tensor:
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
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_out = grad_out.to(w.dtype)
        grad_x = grad_out @ w
        defer_weight_grad(ctx.queue, ctx.weight, lambda: grad_out.flatten(0, -2).t() @ x.flatten(0, -2))
        return grad_x, None, None


def split_linear(x: torch.Tensor, weight: nn.Parameter, queue: WeightGradQueue) -> torch.Tensor:
    """x @ weight.T whose weight gradient waits for W when computed inside a B."""
    return _SplitLinear.apply(x, weight, queue)


def enable_split_backward(module: nn.Module, queue: WeightGradQueue) -> int:
    """Route every bias-free nn.Linear inside `module` through _SplitLinear, and hand `queue` to every
    tensor-parallel layer; returns how many layers now split their backward."""
    count = 0
    for lin in module.modules():
        if isinstance(lin, nn.Linear) and lin.bias is None:
            lin.forward = types.MethodType(lambda self, x: split_linear(x, self.weight, queue), lin)
            count += 1
        elif hasattr(lin, "weight_grad_queue"):  # by attribute: the tensor-parallel layers import this module
            lin.weight_grad_queue = queue
            count += 1
    return count
