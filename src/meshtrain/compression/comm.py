"""1-bit Adam's compressed all-reduce: the mean of a flat fp32 tensor over a group at one bit per
element each way, with two-stage error feedback (after DeepSpeed's compressed_allreduce).

  worker  x + worker error ──sign, a scale ‖b‖₂/√B per block b──▶ signs, scales   (worker error = what was lost)
          cut into `world` chunks ──all-to-all (signs, scales)──▶ rank r holds chunk r of every worker
  server  y = Σ_w scale_w · sign_w (chunk r, in rank order) / world + server error
          ──sign, a scale per block──▶ signs, scales                              (server error = what was lost)
          ──all-gather (signs, scales)──▶ every rank decodes every chunk: the same tensor everywhere

Scales are per block of B elements (default 2048), not one per worker tensor as in DeepSpeed: the
flat tensor is every parameter's momentum end to end, whose magnitudes differ by orders from one
parameter to the next, and one scale for all of it gives the small ones steps far too large. The
tensor is padded to a multiple of world · B, so that each chunk is whole blocks (whole bytes of
signs). Every collective goes through core.comm, counted at its payload: P/8 + 4P/B bytes in the
all-to-all and P/8 + 4P/B in the all-gather, for P padded elements.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from meshtrain.accounting import Recorder
from meshtrain.core import comm
from meshtrain.core.quantize import Compressed, ErrorFeedback, sign_decompress

BLOCK = 2048


def padded_length(numel: int, world: int, block: int = BLOCK) -> int:
    """`numel` rounded up to whole blocks in each of `world` equal chunks."""
    unit = world * block
    return math.ceil(numel / unit) * unit


class CompressedAllReduce:
    """The mean over `group` of a flat fp32 tensor of `padded_length(numel, world, block)` elements;
    the worker and server errors persist between calls (the error feedback), per rank."""

    def __init__(self, numel: int, group: dist.ProcessGroup, stats: Recorder, block: int = BLOCK) -> None:
        if block % 8:
            raise ValueError(f"signs pack eight per byte: block {block} must be a multiple of 8")
        self.group, self.stats, self.block = group, stats, block
        self.world = dist.get_world_size(group)
        self.padded = padded_length(numel, self.world, block)
        self.chunk = self.padded // self.world
        self.worker = ErrorFeedback(bits=1, block=block)
        self.server = ErrorFeedback(bits=1, block=block)

    def reset(self) -> None:
        """Forget both errors (after a checkpoint load: they are not saved)."""
        self.worker.reset()
        self.server.reset()

    def errors(self) -> list[torch.Tensor]:
        """The error buffers this rank holds (none before the first call), for memory accounting."""
        return [fb.error for fb in (self.worker, self.server) if fb.error is not None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.padded:
            raise ValueError(f"the compressed all-reduce takes {self.padded} elements (padded), not {x.numel()}")
        mine = self.worker.compress(x)
        signs, scales = torch.empty_like(mine.data), torch.empty_like(mine.scales)
        comm.all_to_all(signs, mine.data, self.group, self.stats)  # chunk r of every worker, in rank order
        comm.all_to_all(scales, mine.scales, self.group, self.stats)
        k, s = self.chunk // 8, self.chunk // self.block  # bytes of signs and scales per chunk
        total = self._decode(signs[:k], scales[:s], self.chunk)
        for r in range(1, self.world):  # a fixed order, so that every run sums alike
            total = total + self._decode(signs[r * k : (r + 1) * k], scales[r * s : (r + 1) * s], self.chunk)
        reply = self.server.compress(total / self.world)
        # chunks are whole blocks: the gathered chunks are one compressed tensor of every element
        return self._decode(self._gather(reply.data), self._gather(reply.scales), self.padded)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.world * t.numel(), dtype=t.dtype, device=t.device)
        comm.all_gather(out, t, self.group, self.stats)
        return out

    def _decode(self, signs: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
        return sign_decompress(Compressed(signs, scales, numel, self.block, 1))
