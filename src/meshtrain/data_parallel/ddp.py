"""Bucketed, overlapped gradient all-reduce.

Gradients live permanently inside flat bucket buffers (each `param.grad` is a view), so autograd
accumulates straight into the buffer that gets reduced: no copy in or out. Buckets are filled in
reverse registration order, the order in which backward produces gradients, and a bucket's
all-reduce starts the moment its last gradient lands, overlapping with the rest of backward.
Micro-steps before the last one of an accumulation only accumulate: no communication at all.

The loss is pre-divided by the global token count, so a plain SUM gives the global mean gradient
(no division by the DP size, and uneven token counts per rank would still be exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
import torch.distributed as dist
from torch import nn

from meshtrain.accounting import CommStats
from meshtrain.core.comm import TrackedWork
from meshtrain.core.parts import as_parts, backward_order, split_buckets
from meshtrain.data_parallel.comm import all_reduce_async


@dataclass
class Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor
    group: dist.ProcessGroup | None
    """Where this bucket is summed: the data-parallel group, or for experts' gradients the
    expert-data-parallel one; None: nowhere (one rank holds these parameters)."""
    ready: int = 0
    work: TrackedWork | None = None
    reduced: torch.Tensor | None = None  # low-precision copy in flight, when reduce_dtype != fp32


@dataclass
class DataParallel:
    """Owns the gradients of `module` (a model, or the list of a rank's pipeline stages) and keeps
    them summed across `group` (None: one rank)."""

    module: nn.Module | list[nn.Module]
    group: dist.ProcessGroup | None
    stats: CommStats
    bucket_bytes: int = 25 * 2**20
    reduce_dtype: torch.dtype = torch.float32
    buckets: list[Bucket] = field(default_factory=list)
    sync: bool = True
    expert_params: set[str] = field(default_factory=set)
    """Names of expert parameters (expert parallelism): summed over `expert_group` instead."""
    expert_group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        self.parts = as_parts(self.module)
        ordered = [p for part in backward_order(self.parts) for p in part]
        self._names = {id(p): n for part in self.parts for n, p in part.named_parameters()}
        self._owner: dict[nn.Parameter, Bucket] = {}
        experts = [p for p in ordered if self._names[id(p)] in self.expert_params]
        dense = [p for p in ordered if self._names[id(p)] not in self.expert_params]
        for params, group in ((dense, self.group), (experts, self.expert_group)):
            for members in split_buckets(params, self.bucket_bytes) if params else []:
                self._add_bucket(members, group)

    def _add_bucket(self, members: list[nn.Parameter], group: dist.ProcessGroup | None) -> None:
        buf = torch.zeros(sum(p.numel() for p in members), dtype=torch.float32, device=members[0].device)
        bucket = Bucket(members, buf, group)
        offset = 0
        for p in members:
            p.grad = buf[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            self._owner[p] = bucket
            if group is not None:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self.buckets.append(bucket)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for b in self.buckets for p in b.params]

    def set_sync(self, sync: bool) -> None:
        """False on accumulation micro-steps: gradients accumulate locally, nothing is sent."""
        self.sync = sync

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        if not self.sync:
            return
        bucket = self._owner[p]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> TrackedWork:
        if bucket.group is None:
            raise RuntimeError("DataParallel reduces only over a group: with one rank there is nothing to launch")
        if self.reduce_dtype == torch.float32:
            bucket.work = all_reduce_async(bucket.buffer, bucket.group, self.stats)
        else:
            bucket.reduced = bucket.buffer.to(self.reduce_dtype)
            bucket.work = all_reduce_async(bucket.reduced, bucket.group, self.stats)
        return bucket.work

    def finish(self) -> None:
        """Wait for every bucket; buckets whose params got no gradient this step are sent now."""
        reduced = [b for b in self.buckets if b.group is not None]
        works = [bucket.work if bucket.work is not None else self._launch(bucket) for bucket in reduced]
        for bucket, work in zip(reduced, works):
            work.wait()
            if bucket.reduced is not None:
                bucket.buffer.copy_(bucket.reduced)
            bucket.work, bucket.reduced, bucket.ready = None, None, 0

    # ---- the GradEngine contract (meshtrain.engine) -------------------------------------------
    def optim_params(self) -> list[tuple[str, torch.Tensor]]:
        return [(self._names[id(p)], p) for p in self.params]

    def no_decay(self) -> set[str]:
        return {self._names[id(p)] for p in self.params if p.ndim < 2}

    def optim_grads(self) -> list[torch.Tensor]:
        return [cast(torch.Tensor, p.grad) for p in self.params]  # views into the buckets, set in __post_init__

    def after_step(self) -> None:
        pass  # the optimizer updated the model's own parameters

    def state_tensors(self) -> list[torch.Tensor]:
        return self.params + [b.buffer for b in self.buckets]

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p for part in self.parts for n, p in part.named_parameters()}

    def optim_state_dict(self, optim_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return optim_sd  # whole tensors, already keyed by parameter name

    collective_forward = False
    shard_group = None  # every rank holds the whole summed gradient

    def step_metrics(self) -> dict[str, float]:
        return {}

    def describe(self) -> str:
        n = dist.get_world_size(self.group) if self.group is not None else 1
        return (
            f"data parallel over {n} ranks: {len(self.buckets)} gradient buckets of <= {self.bucket_bytes / 2**20:g} MiB, "
            f"all-reduced in {str(self.reduce_dtype).removeprefix('torch.')}"
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()

    def grad_norm(self) -> torch.Tensor:
        # Every rank holds the same summed gradients, so the local norm is the global one. Accumulated
        # in float64: an fp32 sum of squares drifts ~1e-5 relative, the size of our equivalence bounds.
        norms = [torch.linalg.vector_norm(b.buffer, dtype=torch.float64) for b in self.buckets]
        return torch.linalg.vector_norm(torch.stack(norms))

    def scale_grads(self, factor: float) -> None:
        for bucket in self.buckets:
            bucket.buffer.mul_(factor)
