"""ZeRO-1 and ZeRO-2: optimizer state (and at stage 2 the gradients) split over the dp_shard group.

Parameters stay whole on every rank, laid out in flat buckets padded to a multiple of N (the same
buckets, in the same reverse order, as data_parallel/ddp.py). A bucket's gradients are
reduce-scattered the moment its last gradient lands, overlapping with the rest of backward, so each
rank ends up with the sum of its own slice only. It steps that slice; in fp32 the parameters *are*
the master weights, so its master shard is a view of the bucket itself, and an in-place all-gather
of each bucket after the step hands every rank's update to all the others.

Stage 1 keeps whole gradient buckets for good: param.grad are views into them, as in ddp.py, and the
reduce-scatter writes this rank's sums over its own slice, in place. Stage 2 keeps only the fp32
gradient shard: autograd allocates each param.grad, a complete bucket is copied into a flat buffer,
reduce-scattered and dropped, so whole gradients never outlive the bucket that is being reduced.

Accumulation: stage 1 follows the GradEngine contract, micro-steps before the last communicate
nothing and whole gradients accumulate in the buckets, one reduce-scatter per optimizer step.
Stage 2 reduces every micro-step and accumulates into its fp32 shard, because holding whole
gradients across micro-steps would undo the very saving that defines it; DeepSpeed does the same
(its engine refuses no_sync under gradient partitioning), and so does the planner's traffic model.

Pipeline stages: buckets never span two of a rank's stages (interleaved schedules run their
backwards at different times), so a bucket is complete after one microbatch's backward of its
stage, and stage 2 reduces per microbatch as above. Zero-bubble schedules are the exception
(`reduce_each_micro=False`): their W accumulates the linear weights' gradients outside autograd,
where no hook sees them, so stage 2 then keeps whole gradients over the step, as stage 1 does, and
reduces them once in finish() (torchtitan's FSDP + pipelining does the same; DeepSpeed refuses ZeRO-2
with pipelining). Between steps it still holds only the gradient shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from meshtrain.accounting import CommStats, human_bytes
from meshtrain.core.parts import as_parts, backward_order, split_buckets
from meshtrain.zero.base import ExpertShards, FlatUnit, ShardGroups, Unit, ZeroBase
from meshtrain.zero.comm import all_gather, gather_uncounted


def _bucket(unit: Unit) -> torch.Tensor:
    """ZeRO-1's whole gradient bucket, which every stage-1 unit has from construction on."""
    if unit.grad_full is None:
        raise RuntimeError(f"{unit.layout.name} has no gradient bucket: only ZeRO-1 keeps one")
    return unit.grad_full


class Zero12(ZeroBase[Unit]):
    def __init__(
        self,
        module: nn.Module | list[nn.Module],
        stage: int,
        groups: ShardGroups,
        stats: CommStats,
        bucket_bytes: int,
        reduce_dtype: torch.dtype = torch.float32,
        offload: bool = False,
        reduce_each_micro: bool = True,
        experts: ExpertShards | None = None,
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(f"Zero12 runs ZeRO stage 1 or 2, not {stage}")
        parts = as_parts(module)
        super().__init__(groups, stats, reduce_dtype, offload, next(parts[0].parameters()).device, experts)
        self.stage, self.reduce_each_micro = stage, reduce_each_micro
        names = {id(p): n for part in parts for n, p in part.named_parameters()}
        # buckets never span two of a rank's stages, nor dense and expert parameters (they shard over
        # different groups); backward reaches the last stage first
        for params in backward_order(parts):
            for named, shard_groups in self.by_groups([(names[id(p)], p) for p in params]):
                for bucket in split_buckets([p for _, p in named], bucket_bytes):
                    lay = FlatUnit(
                        f"zero.unit{len(self.units)}",
                        [(names[id(p)], p) for p in bucket],
                        shard_groups.size,
                        shard_groups.rank,
                    )
                    self.units.append(self._build_unit(lay, shard_groups))
        self.register_grad_hooks()

    def _build_unit(self, lay: FlatUnit, groups: ShardGroups) -> Unit:
        full = lay.flatten([p.detach() for p in lay.params], torch.float32, self.device)
        for p, view in zip(lay.params, lay.views(full)):
            p.data = view
        master = self.host_copy(full[lay.shard]) if self.offload else full[lay.shard]
        unit = Unit(lay, master, grad=None, full=full, groups=groups)
        if self.stage == 1:
            unit.grad_full = torch.zeros(lay.padded, dtype=torch.float32, device=self.device)
            for p, view in zip(lay.params, lay.views(unit.grad_full)):
                p.grad = view
            # offloaded: the host copy is made per step, in finish(), and dropped in zero_grad()
            unit.grad = None if self.offload else unit.grad_full[lay.shard]
        else:
            grad = torch.zeros(lay.shard_size, dtype=torch.float32, device=self.device)
            unit.grad = self.host_copy(grad) if self.offload else grad
        return unit

    def counting(self) -> bool:
        return self.sync or (self.stage == 2 and self.reduce_each_micro)

    def unit_grads_ready(self, unit: Unit) -> None:
        lay = unit.layout
        if self.stage == 1:
            bucket = _bucket(unit)
            self.reduce(unit, bucket, bucket[lay.shard], "alias")
            return
        flat = lay.flatten([p.grad for p in lay.params], self.reduce_dtype, self.device)
        for p in lay.params:
            p.grad = None  # whole gradients are dropped as soon as their bucket is in flight
        self.reduce(unit, flat, unit.grad_shard(), "add")

    def finish(self) -> None:
        """Reduce buckets the hooks did not (no gradient, or no sync micro-step), then wait for all."""
        for unit in self.units:
            if not unit.launched:
                self.unit_grads_ready(unit)
        self.drain()
        if self.stage == 1 and self.offload:
            for unit in self.units:
                unit.grad = _bucket(unit)[unit.layout.shard]
        self.all_reduce_replicas()
        if self.stage == 1 and self.offload:
            for unit in self.units:
                unit.grad = self.host_copy(unit.grad_shard())
        self.finish_units()

    def after_step(self) -> None:
        """All-gather every bucket in place: each rank contributes the slice it just updated."""
        works = []
        for unit in self.units:
            own = unit.full[unit.layout.shard]
            if self.offload:
                own.copy_(unit.master)
            if unit.groups.shard is not None:
                works.append(all_gather(unit.full, own, unit.groups.shard, self.stats, unit.layout.real_bytes(4)))
        for work in works:
            work.wait()

    def zero_grad(self) -> None:
        for unit in self.units:
            if self.stage == 1:
                _bucket(unit).zero_()
                if self.offload:
                    unit.grad = None
            else:
                unit.grad_shard().zero_()

    def held(self) -> dict[str, Sequence[torch.Tensor | None]]:
        return {
            "params": [u.full for u in self.units],
            "grads": [u.grad_full if self.stage == 1 else u.grad for u in self.units],
            "host master": [u.master for u in self.units] if self.offload else [],
        }

    def traffic(self) -> str:
        psi4 = human_bytes(4 * self.num_params())
        when = "per micro-step" if self.stage == 2 and self.reduce_each_micro else "once"
        return (
            f"reduce-scatter {psi4} {when} in {str(self.reduce_dtype).removeprefix('torch.')}, all-gather {psi4} once"
        )

    def masters_changed(self) -> None:
        for unit in self.units:
            own = unit.full[unit.layout.shard]
            if self.offload:
                own.copy_(unit.master)
            gather_uncounted(unit.full, own, unit.groups.shard, self.stats)
