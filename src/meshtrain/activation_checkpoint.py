"""Activation checkpointing applied from outside the model.

A chosen block's forward is replaced on the instance (not wrapped in a new module), so parameter
names, and with them checkpoints, are the same with or without recomputation.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(blocks: nn.ModuleDict, mode: str, every: int) -> int:
    """Recompute every `every`-th block in backward (mode 'full'); returns how many were wrapped."""
    if mode == "none":
        return 0
    wrapped = 0
    for index, block in enumerate(blocks.values()):
        if index % every:
            continue
        original = block.forward
        block.forward = functools.partial(checkpoint, original, use_reentrant=False)
        wrapped += 1
    return wrapped
