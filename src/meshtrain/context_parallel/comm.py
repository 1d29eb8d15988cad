"""The collectives context parallelism needs, counted and logged by the communication layer.

- ring_exchange: send tensors to the next rank of the cp ring and receive the previous rank's, in flight;
- all_to_all_dim0: Ulysses' all-to-all of equal chunks along dim 0;
- sequence_sum: per-sequence figures (an MoE layer's expert counts) summed over the cp ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from meshtrain.accounting import Recorder
from meshtrain.core import comm

if TYPE_CHECKING:
    from meshtrain.context_parallel.ring import Ring


class Incoming:
    """Tensors arriving from the previous rank; wait() gives them once every send and receive is done."""

    def __init__(self, batch: comm.TrackedBatch, buffers: list[torch.Tensor]) -> None:
        self.batch, self.buffers = batch, buffers

    def wait(self) -> list[torch.Tensor]:
        self.batch.wait()
        return self.buffers


def ring_exchange(ring: Ring, tensors: list[torch.Tensor]) -> Incoming:
    """Post `tensors` to rank r + 1 and receives of the same shapes from rank r - 1 (ranks of the cp group)."""
    after, before = (ring.rank + 1) % ring.size, (ring.rank - 1) % ring.size
    buffers = [torch.empty_like(t) for t in tensors]
    batch = comm.exchange(
        [(t, after) for t in tensors], [(b, before) for b in buffers], ring.group, ring.stats, async_op=True
    )
    return Incoming(batch, buffers)


def all_to_all_dim0(x: torch.Tensor, group: torch.distributed.ProcessGroup, stats: Recorder) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)  # of the contiguous input: empty_like keeps a view's strides
    comm.all_to_all(out, x, group, stats)
    return out


def sequence_sum(t: torch.Tensor, group: torch.distributed.ProcessGroup, stats: Recorder) -> torch.Tensor:
    """`t`, summed over the cp ranks (which hold the other parts of the same sequences); not differentiable."""
    out = t.detach().clone()
    comm.all_reduce(out, group, stats)
    return out
