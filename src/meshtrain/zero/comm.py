"""The collectives ZeRO needs, counted and logged by the communication layer (core/comm.py).

Flat units are padded so every rank's shard has the same size, which the single-tensor collectives
require; the padding is not traffic the strategy asks for, so each call records the bytes of the
*unpadded* unit (`real_bytes`). That keeps the counters equal to the theory (2 psi per step for
ZeRO 1/2, 3 psi for ZeRO 3, times (N-1)/N on the wire) whatever the remainder of psi / N.

ZeRO++'s compressed collectives are counted at what they really move, codes and fp32 scales, padding
included: `quantized_gather` (qwZ) and `hierarchical_reduce_scatter` (qgZ).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshtrain.accounting import CommStats
from meshtrain.core import comm
from meshtrain.core.comm import CompressedGather, TrackedWork, all_to_all_compressed, start_all_gather_compressed


def reduce_scatter(
    out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, real_bytes: float
) -> TrackedWork:
    """Sum `inp` over the group and leave this rank's slice in `out` (which may alias that slice)."""
    return comm.reduce_scatter(out, inp, group, stats, payload=real_bytes, async_op=True)


def all_gather(
    out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, real_bytes: float
) -> TrackedWork:
    """Concatenate every rank's `inp` into `out` (`inp` may alias this rank's slice of `out`)."""
    return comm.all_gather(out, inp, group, stats, payload=real_bytes, async_op=True)


def all_reduce(buf: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, real_bytes: float) -> TrackedWork:
    """Sum a gradient shard over the replicas of HSDP; `real_bytes` is this rank's 1/N share of the unit."""
    return comm.all_reduce(buf, group, stats, payload=real_bytes, async_op=True)


def gather_uncounted(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats) -> None:
    """All-gather for checkpoints: not step traffic, so it is kept out of the per-step counters."""
    if group is None:
        out.copy_(inp)
    else:
        comm.all_gather(out, inp, group, stats, counted=False)


def quantized_gather(shard: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, block: int) -> CompressedGather:
    """qwZ: every rank's fp32 shard as block-wise int8 (one scale per `block`), gathered; wait() decodes."""
    return start_all_gather_compressed(shard, group, stats, bits=8, block=block)


def hierarchical_reduce_scatter(
    flat: torch.Tensor,
    intra: dist.ProcessGroup | None,
    inter: dist.ProcessGroup | None,
    stats: CommStats,
    block: int,
) -> torch.Tensor:
    """qgZ: this rank's fp32 slice of the sum over the shard group of `flat`, in two hops of int4.

    The shard group's rank g = k*L + l sits on node k at place l (L ranks per node, K nodes), and owns
    slice g of `flat`. Hop 1, inside the node: place l' is sent the slices of every node's place l'
    (the reordering that keeps hop 2 one message per peer), and sums what its L peers sent. Hop 2,
    across nodes among the ranks at the same place: each sends node k' the node's partial sum of
    slice k'*L + l, and sums the K partials it gets. Sums are fp32; each hop quantizes afresh.
    A hop whose group is None (one rank) is the identity, unquantized."""
    size_l = dist.get_world_size(intra) if intra is not None else 1
    size_k = dist.get_world_size(inter) if inter is not None else 1
    width = flat.numel() // (size_k * size_l)
    by_place = flat.float().view(size_k, size_l, width).transpose(0, 1).reshape(size_l, size_k * width)
    node_sum = by_place if intra is None else all_to_all_compressed(by_place, intra, stats, bits=4, block=block)
    partials = node_sum.sum(0).view(size_k, width)
    if inter is None:
        return partials.reshape(-1)
    return all_to_all_compressed(partials, inter, stats, bits=4, block=block).sum(0)
