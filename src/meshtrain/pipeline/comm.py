"""Point-to-point transfers between pipeline stages, counted and logged by the communication layer."""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshtrain.accounting import CommStats
from meshtrain.core import comm


def exchange(
    sends: list[tuple[torch.Tensor, int]],
    recvs: list[tuple[torch.Tensor, int]],
    group: dist.ProcessGroup,
    stats: CommStats,
) -> None:
    """Post sends and receives (peers are ranks within `group`) as one batch and wait for all."""
    comm.exchange(sends, recvs, group, stats)
