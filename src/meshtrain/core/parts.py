"""A rank's model parts (the whole model, or its pipeline stages) and their gradient buckets, the
grouping that plain DP all-reduces and ZeRO-1/2 reduce-scatter.

Both strategies fill buckets in reverse registration order, the order in which backward produces
gradients, so a bucket is complete (and its collective can start) while backward is still running.
"""

from __future__ import annotations

from torch import nn


def as_parts(module: nn.Module | list[nn.Module]) -> list[nn.Module]:
    """A rank's model parts in forward order: a lone model is a list of one."""
    return list(module) if isinstance(module, list) else [module]


def split_buckets(params: list[nn.Parameter], limit: int) -> list[list[nn.Parameter]]:
    """Consecutive groups of at most `limit` fp32 bytes (a larger parameter gets a group of its own)."""
    groups: list[list[nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if groups[-1] and size + p.numel() * 4 > limit:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel() * 4
    return groups


def backward_order(parts: list[nn.Module]) -> list[list[nn.Parameter]]:
    """Each part's trainable parameters, last part first and each reversed: the order backward
    produces their gradients (a rank's pipeline stages run their backwards last stage first)."""
    return [[p for p in reversed(list(part.parameters())) if p.requires_grad] for part in reversed(parts)]
