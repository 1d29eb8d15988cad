"""The cross-island mean of DiLoCo's pseudo-gradients, in three codecs, over the outer group.

  fp32  one all-reduce, divided by the islands present
  bf16  rounded to bf16, summed in bf16 by one all-reduce, then divided in fp32 (half the bytes)
  int8  two phases, like INTELLECT-1's int8 ring all-reduce (about a quarter of the bytes):
        cut into K chunks ──all-to-all of block-absmax int8 codes──▶ island i holds chunk i of all
        decode, sum in fp32, divide by K ──all-gather of int8 codes──▶ every island decodes all chunks

Every call goes through core.comm, so the bytes land in the CommStats given (DiLoCo keeps its own,
reported as comm_outer_*) and an emulated slow link between islands delays them. Every island
decodes the same codes, so the result is bit-identical on all of them.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from meshtrain.accounting import Recorder
from meshtrain.core import comm


def mean_over_islands(
    flat: torch.Tensor,
    group: dist.ProcessGroup | None,
    stats: Recorder,
    codec: str,
    block: int,
    divisor: int | None = None,
) -> torch.Tensor:
    """The mean of a flat fp32 tensor over `group` (None: a group of one), as `codec` carries it.
    `divisor`: how many of the group's tensors count (default all): an island joining an elastic
    run (meshtrain.diloco.membership) sends zeros that the mean is not over."""
    if group is None or dist.get_world_size(group) == 1:
        return flat.clone()
    n = dist.get_world_size(group)
    k = n if divisor is None else divisor
    if codec == "fp32":
        out = flat.clone()
        comm.all_reduce(out, group, stats)
        return out.div_(k)
    if codec == "bf16":
        low = flat.to(torch.bfloat16)
        comm.all_reduce(low, group, stats)
        return low.float().div_(k)
    if codec == "int8":
        return _int8_mean(flat, group, stats, n, k, block)
    raise ValueError(f"unknown pseudo-gradient codec {codec!r}: fp32, bf16 or int8")


def _int8_mean(
    flat: torch.Tensor, group: dist.ProcessGroup, stats: Recorder, n: int, k: int, block: int
) -> torch.Tensor:
    chunk = math.ceil(flat.numel() / n)
    padded = torch.nn.functional.pad(flat, (0, chunk * n - flat.numel())).view(n, chunk)
    received = comm.all_to_all_compressed(
        padded, group, stats, bits=8, block=block
    )  # (n, chunk): chunk i of every island
    mine = received.sum(0).div_(k)  # summed in fp32, over the k that count
    return comm.all_gather_compressed(mine, group, stats, bits=8, block=block)[: flat.numel()]


def state_from(tensors: list[torch.Tensor], group: dist.ProcessGroup, source: int, stats: Recorder) -> None:
    """Every rank of `group` gets group rank `source`'s tensors, in place: an all-reduce to which the
    others add zeros (exact), so that it goes through core.comm and is counted like the mean."""
    me = group.rank()
    for t in tensors:
        buf = t.clone() if me == source else torch.zeros_like(t)
        comm.all_reduce(buf, group, stats)
        t.copy_(buf)
