"""Backward split into B (gradient for the input) and W (gradient for the weights), for zero-bubble
schedules.

Every nn.Linear of a stage is routed through `_SplitLinear`. In B its backward returns only the
input gradient and, instead of the weight gradient, queues a closure holding (input, grad_output);
W runs the queue later. Outside a B (whole backward, BW) it behaves as a plain linear layer. The
other parameters (norms, embedding) are small and get their gradients in B as usual.
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
        weight = ctx.weight

        def weight_grad() -> None:
            with torch.no_grad():  # W runs outside backward, where grad mode is on again
                _accumulate(weight, grad_out.flatten(0, -2).t() @ x.flatten(0, -2))

        if ctx.queue.target is None:
            weight_grad()
        else:
            ctx.queue.target.append(weight_grad)
        return grad_x, None, None


def enable_split_backward(module: nn.Module, queue: WeightGradQueue) -> int:
    """Route every bias-free nn.Linear inside `module` through _SplitLinear; returns how many."""
    count = 0
    for lin in module.modules():
        if isinstance(lin, nn.Linear) and lin.bias is None:
            lin.forward = types.MethodType(lambda self, x: _SplitLinear.apply(x, self.weight, queue), lin)
            count += 1
    return count
