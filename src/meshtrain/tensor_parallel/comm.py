"""The collectives tensor parallelism needs, as small autograd functions (Megatron's f, g and their
sequence-parallel conjugates), each one counted and logged by the communication layer (core/comm.py),
and the two rings that async tensor parallelism decomposes SP's all-gather and reduce-scatter into.

Activations are batch-first, (b, s, ...), and sequence parallelism shards dim 1. Gloo's single-tensor
collectives work along dim 0, so the sequence chunks are moved to the front before a collective and
back after it: one copy each way, the price of keeping the model's layout untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshtrain.accounting import Recorder
from meshtrain.core import comm as layer


@dataclass
class TPComm:
    """The tensor-parallel group and where its traffic is counted; passed to every parallel layer."""

    group: dist.ProcessGroup
    stats: Recorder

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)


def all_reduce(
    x: torch.Tensor, comm: TPComm, op: dist.ReduceOp | dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> torch.Tensor:
    """Sum (or `op`) of `x` over the group, out of place."""
    out = x.contiguous().clone()
    layer.all_reduce(out, comm.group, comm.stats, op=op)
    return out


class PendingGather:
    """Each rank's x concatenated along `dim` (rank r's part at offset r*x.shape[dim]), in flight:
    `wait()` gives the result, so the caller can compute in between."""

    def __init__(self, x: torch.Tensor, comm: TPComm, dim: int = 1) -> None:
        t, self.dim = comm.size, dim % x.ndim
        self.src = x.contiguous()  # must stay alive until the collective is done
        self.stacked = torch.empty((t, *x.shape), dtype=x.dtype, device=x.device)
        # Flat views: gloo checks dim 0 of output against world size times dim 0 of input.
        self.work = layer.all_gather(self.stacked.view(-1), self.src.view(-1), comm.group, comm.stats, async_op=True)
        self.shape = list(x.shape)
        self.shape[self.dim] *= t

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.stacked.movedim(0, self.dim).reshape(self.shape)


def all_gather_dim(x: torch.Tensor, comm: TPComm, dim: int = 1) -> torch.Tensor:
    return PendingGather(x, comm, dim).wait()


def all_gather_seq(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """(b, s/t, ...) on each rank -> (b, s, ...)."""
    return all_gather_dim(x, comm, 1)


def reduce_scatter_seq(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """(b, s, ...) partial sums on each rank -> this rank's (b, s/t, ...) chunk of their sum."""
    t = comm.size
    if x.shape[1] % t:
        raise ValueError(f"sequence length {x.shape[1]} is not divisible by the tensor-parallel degree {t}")
    chunks = x.unflatten(1, (t, x.shape[1] // t)).movedim(1, 0).contiguous()
    out = torch.empty(chunks.shape[1:], dtype=x.dtype, device=x.device)
    layer.reduce_scatter(out.view(-1), chunks.view(-1), comm.group, comm.stats)
    return out


def split_dim(x: torch.Tensor, comm: TPComm, dim: int = 1) -> torch.Tensor:
    """This rank's chunk along `dim` of a tensor every rank holds whole: no communication."""
    return x.chunk(comm.size, dim=dim)[comm.rank].contiguous()


def ring_gather(shard: torch.Tensor, comm: TPComm, use: Callable[[int, torch.Tensor], None]) -> None:
    """SP's all-gather as t ring steps: use(c, chunk c) runs on each rank's sequence chunk in turn,
    this rank's own first, while the next chunk is already travelling (collective matmul's gather).

    At step s rank r holds chunk (r + s) mod t; it passes it to r - 1 and takes (r + s + 1) mod t from
    r + 1. Each rank sends t - 1 chunks: the wire bytes of the all-gather it replaces, as p2p.
    """
    t, r = comm.size, comm.rank
    held = shard.contiguous()
    for step in range(t):
        pending = None
        if step < t - 1:
            arriving = torch.empty_like(held)
            pending = layer.exchange([(held, (r - 1) % t)], [(arriving, (r + 1) % t)], comm.group, comm.stats, True)
        use((r + step) % t, held)
        if pending is not None:
            pending.wait()
            held = arriving


def ring_reduce_scatter(partial: Callable[[int], torch.Tensor], comm: TPComm) -> torch.Tensor:
    """SP's reduce-scatter as t ring steps: partial(c) is this rank's summand of sequence chunk c;
    returns this rank's chunk of the sum over ranks (collective matmul's reduce-scatter).

    At step s rank r computes its summand of chunk (r - s - 1) mod t while the running sum of that
    chunk travels from r - 1, adds the two and sends the sum on to r + 1; after t steps the chunk it
    holds is its own, summed over every rank. t - 1 sends of one chunk each, like the all-gather.
    """
    t, r = comm.size, comm.rank
    pending, arriving = None, None
    for step in range(t):
        total = partial((r - step - 1) % t)
        if pending is not None and arriving is not None:
            pending.wait()
            total = total + arriving
        if step == t - 1:
            return total
        sending = total.contiguous()  # named, so it stays alive until the send is waited on
        arriving = torch.empty_like(sending)
        pending = layer.exchange([(sending, (r + 1) % t)], [(arriving, (r - 1) % t)], comm.group, comm.stats, True)
    raise RuntimeError("ring_reduce_scatter needs a group of at least one rank")


Op = Callable[[torch.Tensor, TPComm], torch.Tensor]


class _Conjugate(torch.autograd.Function):
    """One collective in forward and its conjugate in backward: Megatron's f and g, and SP's pairs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TPComm, forward_op: Op, backward_op: Op) -> torch.Tensor:
        ctx.comm, ctx.backward_op = comm, backward_op
        return forward_op(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return ctx.backward_op(grad, ctx.comm), None, None, None


def _identity(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    return x.view_as(x)


def _split_seq(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    return split_dim(x, comm, 1)


def _gather_last(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    return all_gather_dim(x, comm, -1)


def _split_last(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    return split_dim(x, comm, -1)


def _pair(forward_op: Op, backward_op: Op, doc: str) -> Op:
    def apply(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        return _Conjugate.apply(x, comm, forward_op, backward_op)

    apply.__doc__ = doc
    return apply


copy_to_region: Op = _pair(
    _identity, all_reduce, "f: the input enters a region whole; each rank's gradient is partial, so backward sums them."
)
reduce_from_region: Op = _pair(
    all_reduce, _identity, "g: partial outputs leave the region summed; the gradient is already whole on every rank."
)
gather_seq_to_region: Op = _pair(
    all_gather_seq,
    reduce_scatter_seq,
    "SP's f: all-gather the sequence shards; backward reduce-scatters the partial gradient.",
)
reduce_scatter_from_region: Op = _pair(
    reduce_scatter_seq,
    all_gather_seq,
    "SP's g: reduce-scatter partial outputs along the sequence; backward all-gathers.",
)
scatter_seq: Op = _pair(
    _split_seq,
    all_gather_seq,
    "Whole (replicated) sequence -> this rank's shard; backward gathers the gradient's shards.",
)
gather_seq: Op = _pair(
    all_gather_seq,
    _split_seq,
    "Shards -> the whole sequence on every rank; its gradient is whole too, so backward keeps this rank's chunk.",
)
gather_last_dim: Op = _pair(
    _gather_last, _split_last, "Feature shards -> all features on every rank (the head's logits in eval mode)."
)
