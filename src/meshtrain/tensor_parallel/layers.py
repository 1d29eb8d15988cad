"""Megatron's parallel layers: column- and row-parallel linears, the vocab-parallel embedding, and a
cross-entropy over vocab-sharded logits that never gathers them.

A region (attention, MLP, the head) is entered once by `enter_region` and left once by a row-parallel
layer, so q, k and v (or gate and up) share one entry collective. Without sequence parallelism the
entry is f (identity forward, all-reduce backward) and the exit g (all-reduce forward). With it the
residual stream between regions is sharded along the sequence: the entry all-gathers it and the exit
reduce-scatters. The column-parallel layers of a sequence-parallel region keep only the input's
sequence shard for backward and all-gather it again there (Korthikanti et al. 2022, sec. 4.2.2), so
every activation a block stores is split by the tensor-parallel degree.

Async tensor parallelism (`async_tp`, on top of SP) turns each of those collectives into a collective
matmul (Wang et al. 2022): a region's entry gathers the sequence chunks around a ring, and every
column layer of the region multiplies each chunk as it arrives while the next one travels; a row
layer computes its output chunk by chunk and sends the running sums around the ring, each rank
adding its own product, so that each chunk's sum ends on the rank that keeps it. Backward is
decomposed alike: a column region's input gradient is a ring reduce-scatter of per-chunk products,
its weight gradients multiply the re-gathered chunks as they arrive, and a row layer's output
gradient is ring-gathered into its input and weight gradients chunk by chunk. What is saved for
backward is what plain SP saves: the region's input shard, the row layers' inputs, the weights.

Sequence parallelism is a training-time memory saving: in eval mode the layers run plain tensor
parallelism, so sequences of any length work (generation grows them one token at a time), and the
vocab-parallel head returns whole logits, like Megatron's parallel_output=False for inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from meshtrain.core.weight_grads import WeightGradQueue, defer_weight_grad, defer_weight_grads_of, split_linear
from meshtrain.tensor_parallel.comm import (
    PendingGather,
    TPComm,
    all_reduce,
    copy_to_region,
    gather_last_dim,
    gather_seq_to_region,
    reduce_from_region,
    reduce_scatter_from_region,
    ring_gather,
    ring_reduce_scatter,
)

_SHARD_ATTR = "_tp_sequence_shard"
_RING_ATTR = "_tp_ring_outputs"


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


class _Regather:
    """One region's sequence shard, all-gathered again in backward once for all its consumers."""

    def __init__(self, comm: TPComm) -> None:
        self.comm = comm
        self.users = 0
        self.pending: PendingGather | None = None
        self.full: torch.Tensor | None = None

    def start(self, shard: torch.Tensor) -> None:
        if self.full is None and self.pending is None:
            self.pending = PendingGather(shard, self.comm, 1)

    def get(self) -> torch.Tensor:
        if self.full is None:
            if self.pending is None:
                raise RuntimeError("_Regather.get() called before start(): no gather in flight")
            self.full, self.pending = self.pending.wait(), None
        full = self.full
        self.users -= 1
        if self.users <= 0:  # the last consumer's backward: let the gathered copy go
            self.full = None
        return full


def enter_region(
    x: torch.Tensor, comm: TPComm, sequence_parallel: bool, ring: Sequence[ColumnParallelLinear] = ()
) -> torch.Tensor:
    """The input of a tensor-parallel region: whole on every rank (f), or gathered from shards.
    With `ring` (async TP), the gather is a collective matmul that also computes those column layers'
    outputs; each of them then finds its own riding on the gathered tensor."""
    dtype = _autocast_dtype(x)
    if dtype is not None:  # the linears would cast anyway; casting first halves the bytes sent
        x = x.to(dtype)
    if not sequence_parallel:
        return copy_to_region(x, comm)
    if ring:
        queue = ring[0].weight_grad_queue  # one queue per stage: every layer of a part shares it
        full, *outputs = _RingColumn.apply(x, comm, queue, *[layer.weight for layer in ring])
        setattr(full, _RING_ATTR, {id(layer): y for layer, y in zip(ring, outputs)})
        return full
    full = gather_seq_to_region(x, comm)
    regather = _Regather(comm)
    setattr(full, _SHARD_ATTR, (x, regather))
    return full


class _ShardSavingLinear(torch.autograd.Function):
    """y = x_full @ w.T, saving the sequence shard of x_full rather than x_full itself."""

    @staticmethod
    def forward(
        ctx,
        x_full: torch.Tensor,
        shard: torch.Tensor,
        weight: nn.Parameter,
        regather: _Regather,
        queue: WeightGradQueue | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(shard, weight)
        ctx.regather, ctx.queue, ctx.weight = regather, queue, weight
        regather.users += 1
        with torch.autocast(x_full.device.type, enabled=False):
            return F.linear(x_full, weight.to(x_full.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor | None, None, None]:
        shard, weight = ctx.saved_tensors
        regather = ctx.regather
        deferred = ctx.queue is not None and ctx.queue.target is not None  # a zero-bubble B: W does it
        if not deferred:
            regather.start(shard)  # overlaps with the input gradient, which does not need it
        grad_x = grad @ weight.to(grad.dtype)

        def weight_grad() -> torch.Tensor:
            regather.start(shard)  # a no-op when already started, or done for another consumer
            x_full = regather.get()
            return (grad.flatten(0, -2).t() @ x_full.flatten(0, -2).to(grad.dtype)).to(weight.dtype)

        if ctx.queue is None:
            return grad_x, None, weight_grad(), None, None
        # Split on: at once or in W, but outside autograd either way, as for the stages' nn.Linear.
        defer_weight_grad(ctx.queue, ctx.weight, weight_grad)
        return grad_x, None, None, None, None


def _rows(c: int, size: int) -> slice:
    return slice(c * size, (c + 1) * size)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return _autocast_dtype(x) or x.dtype


class _RingColumn(torch.autograd.Function):
    """The gathered input x and x @ w.T for each column weight w of a region, from this rank's
    sequence shard: each arriving chunk is multiplied while the next travels (ring_gather)."""

    @staticmethod
    def forward(
        ctx, shard: torch.Tensor, comm: TPComm, queue: WeightGradQueue | None, *weights: nn.Parameter
    ) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(shard, *weights)
        ctx.comm, ctx.queue, ctx.weights = comm, queue, weights
        b, size = shard.shape[0], shard.shape[1]
        full = shard.new_empty((b, size * comm.size, *shard.shape[2:]))
        outputs = [shard.new_empty((b, size * comm.size, w.shape[0])) for w in weights]
        cast = [w.to(shard.dtype) for w in weights]

        def use(c: int, chunk: torch.Tensor) -> None:
            full[:, _rows(c, size)] = chunk
            for y, w in zip(outputs, cast):
                y[:, _rows(c, size)] = F.linear(chunk, w)

        with torch.autocast(shard.device.type, enabled=False):
            ring_gather(shard, comm, use)
        return (full, *outputs)

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor | None, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        shard, *weights = ctx.saved_tensors
        size, live = shard.shape[1], [(k, g) for k, g in enumerate(grads) if g is not None]
        cast = {k: weights[k].to(g.dtype) for k, g in live}

        def partial(c: int) -> torch.Tensor:
            # this rank's summand of chunk c's input gradient: every consumer's, plus any direct use
            terms = [g[:, _rows(c, size)] @ cast[k] for k, g in live]
            if grad_full is not None:
                terms.append(grad_full[:, _rows(c, size)])
            if not terms:
                return shard.new_zeros(shard.shape)
            return torch.stack(terms).sum(0) if len(terms) > 1 else terms[0]

        grad_shard = ring_reduce_scatter(partial, ctx.comm)

        def weight_grads() -> list[torch.Tensor | None]:
            acc = {k: torch.zeros(weights[k].shape, dtype=torch.float32, device=shard.device) for k, _ in live}

            def use(c: int, chunk: torch.Tensor) -> None:
                for k, g in live:
                    acc[k] += (g[:, _rows(c, size)].flatten(0, -2).t() @ chunk.flatten(0, -2).to(g.dtype)).float()

            ring_gather(shard, ctx.comm, use)  # the input was saved as a shard: gather it again
            return [acc[k].to(w.dtype) if k in acc else None for k, w in enumerate(weights)]

        if ctx.queue is None:
            return grad_shard, None, None, *weight_grads()
        defer_weight_grads_of(ctx.queue, ctx.weights, weight_grads)  # at once, or in W (a zero-bubble B)
        return grad_shard, None, None, *([None] * len(weights))


class _RingRow(torch.autograd.Function):
    """A row layer's matmul and SP's reduce-scatter as one ring: this rank's chunk of the sum over
    ranks of x @ w.T, each chunk's product computed while the running sums travel."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: nn.Parameter, comm: TPComm, queue: WeightGradQueue | None
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        x = x.to(dtype)  # what F.linear under autocast would save
        ctx.save_for_backward(x, weight)
        ctx.comm, ctx.queue, ctx.weight = comm, queue, weight
        w, size = weight.to(dtype), x.shape[1] // comm.size
        with torch.autocast(x.device.type, enabled=False):
            return ring_reduce_scatter(lambda c: F.linear(x[:, _rows(c, size)], w), comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        w, size = weight.to(grad.dtype), grad.shape[1]
        grad_x = x.new_empty(x.shape, dtype=grad.dtype)
        deferred = ctx.queue is not None and ctx.queue.target is not None  # a zero-bubble B: W does it
        # in W the weight gradient needs the whole output gradient: keep the gathered chunks for it
        whole = grad.new_empty((*x.shape[:-1], grad.shape[-1])) if deferred else None
        acc = None if deferred else torch.zeros(weight.shape, dtype=torch.float32, device=grad.device)

        def use(c: int, chunk: torch.Tensor) -> None:
            grad_x[:, _rows(c, size)] = chunk @ w
            if whole is not None:
                whole[:, _rows(c, size)] = chunk
            if acc is not None:
                acc.add_((chunk.flatten(0, -2).t() @ x[:, _rows(c, size)].flatten(0, -2).to(grad.dtype)).float())

        ring_gather(grad, ctx.comm, use)

        def weight_grad() -> torch.Tensor:
            if acc is not None:
                return acc.to(weight.dtype)
            if whole is None:
                raise RuntimeError("_RingRow: neither a weight gradient nor the output gradient was kept")
            return (whole.flatten(0, -2).t() @ x.flatten(0, -2).to(whole.dtype)).to(weight.dtype)

        if ctx.queue is None:
            return grad_x, weight_grad(), None, None
        defer_weight_grad(ctx.queue, ctx.weight, weight_grad)
        return grad_x, None, None, None


def region_linear(x: torch.Tensor, weight: nn.Parameter, queue: WeightGradQueue | None = None) -> torch.Tensor:
    """F.linear, except on a gathered sequence-parallel input, where only the shard is saved; with a
    `queue` (pipeline B/W split), the weight gradient of a backward inside a B waits for W.

    The shard rides on the gathered tensor as an attribute. A hook that replaces the tensor on its way
    to the linear drops it, and the linear then saves the whole input: correct, only larger.
    """
    saved = getattr(x, _SHARD_ATTR, None)
    if saved is not None:
        return _ShardSavingLinear.apply(x, saved[0], weight, saved[1], queue)
    return F.linear(x, weight) if queue is None else split_linear(x, weight, queue)


def _local_rows(full: torch.Tensor, dim: int, comm: TPComm) -> torch.Tensor:
    return full.chunk(comm.size, dim=dim)[comm.rank].detach().clone()


class ColumnParallelLinear(nn.Module):
    """y[..., shard] = x @ W[shard].T: output features split across ranks, the input whole.

    `entry=False` when an enclosing region already entered (q, k, v share the attention's entry).
    `gather_in_eval`: in eval mode, return every rank's features (the head's whole logits).
    `async_tp`: an own entry is a collective matmul (with SP, in training).
    """

    def __init__(
        self,
        full_weight: torch.Tensor,
        comm: TPComm,
        sequence_parallel: bool,
        entry: bool,
        gather_in_eval: bool = False,
        async_tp: bool = False,
    ) -> None:
        super().__init__()
        self.comm, self.sequence_parallel, self.entry = comm, sequence_parallel, entry
        self.gather_in_eval, self.async_tp = gather_in_eval, async_tp
        self.weight = nn.Parameter(_local_rows(full_weight, 0, comm))
        self.weight_grad_queue: WeightGradQueue | None = None

    def defer_weight_grads(self, queue: WeightGradQueue) -> None:
        """The B/W split (meshtrain.core.weight_grads): weight gradients of a B wait for W."""
        self.weight_grad_queue = queue

    @torch.compiler.disable  # collectives run eagerly: a compiled block breaks its graph here
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.entry:
            x = enter_region(x, self.comm, self.sequence_parallel and self.training, [self] if self.async_tp else ())
        ready = getattr(x, _RING_ATTR, None)
        if ready is not None and id(self) in ready:  # the region's collective matmul computed it
            return ready.pop(id(self))  # popped: a second call on the same input multiplies again
        y = region_linear(x, self.weight, self.weight_grad_queue)
        return gather_last_dim(y, self.comm) if self.gather_in_eval and not self.training else y


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[..., shard] @ W[:, shard].T: the region's exit collective."""

    def __init__(
        self, full_weight: torch.Tensor, comm: TPComm, sequence_parallel: bool, async_tp: bool = False
    ) -> None:
        super().__init__()
        self.comm, self.sequence_parallel, self.async_tp = comm, sequence_parallel, async_tp
        self.weight = nn.Parameter(_local_rows(full_weight, 1, comm))
        self.weight_grad_queue: WeightGradQueue | None = None

    def defer_weight_grads(self, queue: WeightGradQueue) -> None:
        """The B/W split (meshtrain.core.weight_grads): weight gradients of a B wait for W."""
        self.weight_grad_queue = queue

    @torch.compiler.disable  # collectives run eagerly: a compiled block breaks its graph here
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.async_tp and self.sequence_parallel and self.training:
            return _RingRow.apply(x, self.weight, self.comm, self.weight_grad_queue)
        partial = region_linear(x, self.weight, self.weight_grad_queue)  # x is feature-split: never a shard
        if self.sequence_parallel and self.training:
            return reduce_scatter_from_region(partial, self.comm)
        return reduce_from_region(partial, self.comm)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous block of vocabulary rows; ids outside it contribute zeros."""

    def __init__(self, full_weight: torch.Tensor, comm: TPComm, sequence_parallel: bool) -> None:
        super().__init__()
        self.comm, self.sequence_parallel = comm, sequence_parallel
        self.weight = nn.Parameter(_local_rows(full_weight, 0, comm))
        self.vocab_start = comm.rank * self.weight.shape[0]

    @torch.compiler.disable  # collectives run eagerly: a compiled block breaks its graph here
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        partial = F.embedding(local.masked_fill(outside, 0), self.weight)
        partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel and self.training:
            return reduce_scatter_from_region(partial, self.comm)
        return reduce_from_region(partial, self.comm)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Summed token cross-entropy of logits split along the vocabulary (Megatron's algorithm)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, comm: TPComm) -> torch.Tensor:
        logits = logits.float()
        # The max only stabilises exp(); it cancels in the loss, so no gradient flows through it.
        peak = all_reduce(logits.amax(dim=-1), comm, torch.distributed.ReduceOp.MAX)
        shifted = logits - peak.unsqueeze(-1)
        vocab = logits.shape[-1]
        local = targets - comm.rank * vocab
        outside = (local < 0) | (local >= vocab)
        local = local.masked_fill(outside, 0)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp_()
        # One collective for both sums: the softmax denominator and the target's logit.
        sums = all_reduce(torch.stack([exp.sum(dim=-1), picked]), comm)
        ctx.save_for_backward(exp, sums[0], local, outside)
        return (sums[0].log() - sums[1]).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        exp, denom, local, outside = ctx.saved_tensors
        grad_logits = exp / denom.unsqueeze(-1)
        hit = (~outside).to(grad_logits.dtype).unsqueeze(-1)
        grad_logits.scatter_add_(-1, local.unsqueeze(-1), -hit)
        return grad_logits.mul_(grad), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """sum over tokens of -log softmax(logits)[target], from this rank's vocabulary shard of logits."""
    return _VocabParallelCrossEntropy.apply(logits, targets, comm)


class VocabParallelLoss:
    """The loss under tensor parallelism (TensorParallel.loss_fn): (local logits, targets) -> summed loss."""

    def __init__(self, comm: TPComm) -> None:
        self.comm = comm

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, self.comm)
