"""Megatron's parallel layers: column- and row-parallel linears, the vocab-parallel embedding, and a
cross-entropy over vocab-sharded logits that never gathers them.

A region (attention, MLP, the head) is entered once by `enter_region` and left once by a row-parallel
layer, so q, k and v (or gate and up) share one entry collective. Without sequence parallelism the
entry is f (identity forward, all-reduce backward) and the exit g (all-reduce forward). With it the
residual stream between regions is sharded along the sequence: the entry all-gathers it and the exit
reduce-scatters. The column-parallel layers of a sequence-parallel region keep only the input's
sequence shard for backward and all-gather it again there (Korthikanti et al. 2022, sec. 4.2.2), so
every activation a block stores is split by the tensor-parallel degree.

Sequence parallelism is a training-time memory saving: in eval mode the layers run plain tensor
parallelism, so sequences of any length work (generation grows them one token at a time), and the
vocab-parallel head returns whole logits, like Megatron's parallel_output=False for inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshtrain.core.weight_grads import WeightGradQueue, defer_weight_grad, split_linear
from meshtrain.tensor_parallel.comm import (
    PendingGather,
    TPComm,
    all_reduce,
    copy_to_region,
    gather_last_dim,
    gather_seq_to_region,
    reduce_from_region,
    reduce_scatter_from_region,
)

_SHARD_ATTR = "_tp_sequence_shard"


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


def enter_region(x: torch.Tensor, comm: TPComm, sequence_parallel: bool) -> torch.Tensor:
    """The input of a tensor-parallel region: whole on every rank (f), or gathered from shards."""
    dtype = _autocast_dtype(x)
    if dtype is not None:  # the linears would cast anyway; casting first halves the bytes sent
        x = x.to(dtype)
    if not sequence_parallel:
        return copy_to_region(x, comm)
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
    """

    def __init__(
        self,
        full_weight: torch.Tensor,
        comm: TPComm,
        sequence_parallel: bool,
        entry: bool,
        gather_in_eval: bool = False,
    ) -> None:
        super().__init__()
        self.comm, self.sequence_parallel, self.entry = comm, sequence_parallel, entry
        self.gather_in_eval = gather_in_eval
        self.weight = nn.Parameter(_local_rows(full_weight, 0, comm))
        self.weight_grad_queue: WeightGradQueue | None = None

    def defer_weight_grads(self, queue: WeightGradQueue) -> None:
        """The B/W split (meshtrain.core.weight_grads): weight gradients of a B wait for W."""
        self.weight_grad_queue = queue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.entry:
            x = enter_region(x, self.comm, self.sequence_parallel and self.training)
        y = region_linear(x, self.weight, self.weight_grad_queue)
        return gather_last_dim(y, self.comm) if self.gather_in_eval and not self.training else y


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[..., shard] @ W[:, shard].T: the region's exit collective."""

    def __init__(self, full_weight: torch.Tensor, comm: TPComm, sequence_parallel: bool) -> None:
        super().__init__()
        self.comm, self.sequence_parallel = comm, sequence_parallel
        self.weight = nn.Parameter(_local_rows(full_weight, 1, comm))
        self.weight_grad_queue: WeightGradQueue | None = None

    def defer_weight_grads(self, queue: WeightGradQueue) -> None:
        """The B/W split (meshtrain.core.weight_grads): weight gradients of a B wait for W."""
        self.weight_grad_queue = queue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
