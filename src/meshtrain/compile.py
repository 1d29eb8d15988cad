"""torch.compile, switched on from outside the model (build step 5).

Mode "blocks" (torchtitan's default) compiles each transformer block's body: the Block module is
neither wrapped nor replaced, so parameter names, checkpoints and HF export stay the same, and the
hooks other strategies put on the block (ZeRO-3's gather and free, DP's gradient hooks on the
parameters) run outside the compiled region, once per call, exactly as without compile. Activation
checkpointing stays outside too: the block checkpoints its compiled body. Layers that talk to other
ranks or defer work to a later schedule action (tensor-parallel linears, the B/W split's linears)
are marked `torch.compiler.disable` where they are defined: the graph breaks there on purpose and
they run eagerly, so their collectives and Python-side queues behave as they always do.

Mode "model" compiles each part (the model or a pipeline stage) in place with `nn.Module.compile`,
which also keeps names; module hooks then sit inside the compiled region, so validation refuses it
where a strategy hooks modules (ZeRO-3).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from meshtrain.model.llama import Block, Llama


def apply_compile(parts: list[nn.Module], mode: str) -> int:
    """Compile each part's blocks (mode 'blocks') or each whole part ('model'); returns how many
    modules were compiled."""
    if mode == "none":
        return 0
    if mode == "model":
        for part in parts:
            part.compile()  # in place: state_dict keys keep their names (torch.compile(m) adds _orig_mod.)
        return len(parts)
    compiled = 0
    for part in parts:
        for block in cast(Llama, part).model.layers.values():
            block = cast(Block, block)
            block.body = torch.compile(block._forward)
            compiled += 1
    return compiled
