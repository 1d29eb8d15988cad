"""Activation checkpointing, switched on from outside the model.

A chosen block's `recompute` flag (meshtrain.model.llama.Block) makes it recompute its activations
in backward; no module is wrapped or replaced, so parameter names, and with them checkpoints, are
the same with or without recomputation, and hooks other strategies put on the block still fire once.
"""

from __future__ import annotations

from typing import cast

from torch import nn

from meshtrain.model.llama import Block


def apply_activation_checkpointing(blocks: nn.ModuleDict, mode: str, every: int) -> int:
    """Recompute every `every`-th block in backward (mode 'full'); returns how many were chosen."""
    if mode == "none":
        return 0
    chosen = 0
    for index, block in enumerate(blocks.values()):
        if index % every == 0:
            cast(Block, block).recompute = True
            chosen += 1
    return chosen
