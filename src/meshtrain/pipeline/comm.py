"""Point-to-point transfers between pipeline stages, each counted in CommStats."""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshtrain.accounting import CommStats


def exchange(
    sends: list[tuple[torch.Tensor, int]],
    recvs: list[tuple[torch.Tensor, int]],
    group: dist.ProcessGroup,
    stats: CommStats,
) -> None:
    """Post sends and receives (peers are ranks within `group`) as one batch and wait for all."""
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer) for t, peer in recvs]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    for t, _ in sends:
        stats.record("p2p", t.numel() * t.element_size(), 2)
