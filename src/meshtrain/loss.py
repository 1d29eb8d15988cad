"""The training loss, shared by the plain loop and the pipeline's last stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy in fp32; callers divide by the global token count."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
