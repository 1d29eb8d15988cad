"""Context parallelism: every sequence is split over the cp ranks, and attention is computed across them.

- ring.py     ring attention: keys and values travel the cp ring; contiguous or zigzag sharding
- ulysses.py  all-to-all attention (DeepSpeed Ulysses): a sequence shard traded for a head shard
- kernels.py  one block's attention with its log-sum-exp, the merge rule, and their backward
- comm.py     the ring exchange and the all-to-all, counted and logged

`apply_context_parallel` gives every block's attention the cp attention function and returns a
`ContextParallel`, whose `shard` cuts each micro-batch's tokens, targets (already shifted: shift,
then shard) and positions (the global ones, for RoPE) to this rank's part. Everything else is
unchanged: a rank's summed loss covers its tokens, scaled by 1 / tokens in the global batch, so the
gradients summed over dp x cp and the losses summed over the world are the single device's.
Per-sequence figures that are not sums over tokens (an MoE layer's auxiliary loss needs each
sequence's expert counts) come whole from `ContextParallel.sequence_sum`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from meshtrain.accounting import Recorder
from meshtrain.context_parallel import comm
from meshtrain.context_parallel.ring import Ring, ring_attention
from meshtrain.context_parallel.ulysses import Ulysses, ulysses_attention
from meshtrain.core.runner import Batch

__all__ = ["ContextParallel", "apply_context_parallel", "shard_indices"]


def shard_indices(seq_len: int, size: int, rank: int, zigzag: bool) -> torch.Tensor:
    """The global positions rank `rank` holds: chunk r of `size` (contiguous), or chunks r and
    2*size-1-r of 2*size (zigzag), in increasing order."""
    if zigzag:
        c = seq_len // (2 * size)
        return torch.cat(
            [torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * size - 1 - rank) * c, (2 * size - rank) * c)]
        )
    c = seq_len // size
    return torch.arange(rank * c, (rank + 1) * c)


@dataclass(frozen=True)
class ContextParallel:
    group: dist.ProcessGroup
    size: int
    rank: int
    mode: str
    """ring or ulysses."""
    zigzag: bool
    """The ring's sharding (Ulysses always shards contiguously)."""
    stats: Recorder

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.mode == "ulysses":
            return ulysses_attention(q, k, v, Ulysses(self.group, self.size, self.stats))
        return ring_attention(q, k, v, Ring(self.group, self.size, self.rank, self.zigzag, self.stats))

    def sequence_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sequence figures of this rank's tokens, summed over the cp ranks: the whole sequences'."""
        return comm.sequence_sum(t, self.group, self.stats)

    def shard(self, batch: Batch) -> Batch:
        """This rank's part of a micro-batch (positions filled in: meshtrain.core.runner.with_positions)."""
        if batch.positions is None:
            raise ValueError("shard a batch after its positions are explicit")
        idx = shard_indices(batch.tokens.shape[1], self.size, self.rank, self.zigzag).to(batch.tokens.device)
        return replace(
            batch, tokens=batch.tokens[:, idx], targets=batch.targets[:, idx], positions=batch.positions[idx]
        )


def apply_context_parallel(
    parts: list[nn.Module], group: dist.ProcessGroup, mode: str, balance: str, stats: Recorder
) -> ContextParallel:
    """Give every block's attention (`model.layers.*.self_attn`) the cp attention function."""
    cp = ContextParallel(
        group, dist.get_world_size(group), dist.get_rank(group), mode, mode == "ring" and balance == "zigzag", stats
    )
    for part in parts:
        for name, module in part.named_modules():
            if name.endswith("self_attn"):
                module.attention = cp.attention
    return cp
