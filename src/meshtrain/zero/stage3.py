"""ZeRO-3: parameters, gradients and optimizer state all split over the dp_shard group.

The model is cut into flat units: the embedding, each transformer block, and the final norm with
the head (one root unit holding embedding, norm and head when their weights are tied). A rank keeps
only its fp32 shard of each unit. The unit's parameters are views into a padded flat buffer whose
*storage* is allocated and all-gathered just before the unit computes, and resized to zero right
after, without replacing any tensor: the views that autograd saved in forward stay valid, and
simply see the data again once backward re-gathers the same storage. This is FSDP's trick, and it
is why no saved-tensor hooks are needed; it works unchanged under activation checkpointing, whose
recomputation runs inside the unit's backward, after the re-gather.

Schedule, per micro-step and unit: a forward pre-hook gathers the unit (or waits for the gather
already in flight) and starts the next unit's gather (prefetch); a forward hook frees it and hooks
its output, so that the gradient arriving there gathers it again and prefetches the unit backward
reaches next; once autograd has accumulated the gradient of every parameter of the unit, the unit
is freed and its gradients are copied into a flat buffer, reduce-scattered, and dropped. At most two
units are gathered at a time (the one computing and the one prefetched), and at most two reductions
are in flight. Gradients are reduced every micro-step, accumulating into the fp32 shard, since whole
gradients of all units would be the very memory ZeRO-3 is for: the set_sync hint is not needed.

Pipeline stages: each of a rank's stages (a Llama holding some blocks, the embedding on the first,
norm and head on the last) is cut into units the same way, unit names keeping the global block
index. Prefetching stays within a stage: the unit a stage computes next may be a different stage's
only much later. Each microbatch's backward of a stage produces every gradient of its units, so
units are reduced per microbatch as above.

Zero-bubble schedules (any with W actions): a B leaves the linear weights' gradients to closures
that W runs later, outside autograd. Those closures compute dW = dY^T X from the saved input and
output gradient and never read the weight, so the unit is freed after its B as usual: no block is
kept gathered until W and none is gathered again for it. What moves is the reduce-scatter: a unit
whose B queued closures (the engine watches the WeightGradQueue) is reduced when the last of them
has landed in W, with whatever its `.grad` holds by then (its norms' gradients from B included,
perhaps from a later microbatch's B too: sums reduced in any grouping add up to the same shard).
A unit whose B queued nothing (the embedding) is reduced after B, as before. So the traffic is
1F1B's to the byte, and W's reduce-scatters overlap the next unit's W.

Mixed precision: with bf16 compute the shards stay fp32 (they are the master weights) and the
gather moves bf16, as FSDP2's param_dtype does; gradients are reduced in parallel.reduce_dtype.

ZeRO++ (`ZeroPP`, each part on its own flag; docs/compression.md):
- qwZ: the parameter gathers carry block-wise int8 codes of the fp32 shards and their scales, decoded
  on receipt; every rank decodes the same values, so all compute with the same (quantized) weights.
- hpZ: each forward gather also keeps this rank's 1/L slice of the gathered unit (L = the shard
  group's ranks on this node) as a secondary shard; backward gathers from those, inside the node.
  The secondary is rewritten by every forward gather, so it always holds the weights the forward
  used: it cannot go stale across an optimizer step or a checkpoint load (DeepSpeed #7606).
- qgZ: the gradient reduce-scatter becomes two int4 all-to-alls, inside the node then across nodes,
  summed in fp32 (zero/comm.py's hierarchical_reduce_scatter); it runs synchronously.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from meshtrain.accounting import CommStats, human_bytes
from meshtrain.core.comm import CompressedGather, TrackedWork
from meshtrain.core.parts import as_parts
from meshtrain.core.weight_grads import WeightGradQueue
from meshtrain.model import Llama
from meshtrain.zero.base import ExpertShards, FlatUnit, ShardGroups, Unit, ZeroBase, named_unique
from meshtrain.zero.comm import all_gather, hierarchical_reduce_scatter, quantized_gather


@dataclass(frozen=True)
class ZeroPP:
    """ZeRO++'s three parts (module docstring) and the shard group cut by node that hpZ and qgZ use."""

    qwz: bool = False
    hpz: bool = False
    qgz: bool = False
    block: int = 2048
    """Elements per fp32 scale, for qwZ's int8 and qgZ's int4."""
    intra: dist.ProcessGroup | None = None
    """The shard group's ranks on this node."""
    inter: dist.ProcessGroup | None = None
    """The shard group's ranks at this rank's place on every node."""

    def describe(self) -> str:
        parts = [name for name, on in (("qwZ", self.qwz), ("hpZ", self.hpz), ("qgZ", self.qgz)) if on]
        return f"ZeRO++ {'+'.join(parts)}" if parts else ""


@dataclass(eq=False, kw_only=True)
class GatherUnit(Unit):
    index: int
    shard: torch.Tensor
    """fp32 shard on the device: the source of every gather (and the master, unless offloaded)."""
    state: str = "free"
    """free (storage size 0), inflight (gather launched) or ready."""
    work: TrackedWork | CompressedGather | None = None
    source: torch.Tensor | None = field(default=None, repr=False)
    secondary: torch.Tensor | None = None
    """hpZ: this rank's slice of the unit as the last forward gathered it, in the compute dtype."""
    refresh: bool = False
    """hpZ: the gather in flight is a primary one, so its result rewrites the secondary."""
    queued: int = 0
    """Weight gradients the B running now left to W (zero-bubble schedules)."""
    owed: deque[int] = field(default_factory=deque)
    """Per finished B whose W has not run yet, how many of its weight gradients W still owes."""


@dataclass(frozen=True)
class UnitSpec:
    name: str
    modules: list[tuple[str, nn.Module]]
    first: nn.Module
    """Its forward pre-hook gathers the unit."""
    last: nn.Module
    """Its forward hook frees the unit and hooks the output for backward."""
    order: tuple[int, int]
    """Positions of first and last in the model's forward: they order gathers and prefetches."""


def following(specs: list[UnitSpec], start: int, position: int, reverse: bool) -> dict[int, int]:
    """Unit index -> the unit its pass reaches next (forward: by first module; backward, reverse=True:
    by last module, latest first), over `specs` numbered from `start`."""
    order = sorted(range(len(specs)), key=lambda i: specs[i].order[position], reverse=reverse)
    return {start + a: start + b for a, b in zip(order, order[1:])}


def block_specs(model: Llama) -> list[UnitSpec]:
    """Embedding, each block, norm + head in forward order; one root unit when embedding and head are tied."""
    b, head = model.model, model.lm_head
    names = {id(m): n for n, m in model.named_modules()}
    blocks = list(b.layers.values())
    ends = [m for m in (b.norm, head) if m is not None]
    last_pos = len(blocks) + 2
    specs = [
        UnitSpec(f"zero.layers.{names[id(blk)].rsplit('.', 1)[-1]}", [(names[id(blk)], blk)], blk, blk, (i + 1, i + 1))
        for i, blk in enumerate(blocks)
    ]
    if head is not None and b.embed_tokens is not None and head.weight is b.embed_tokens.weight:  # tied
        mods = [b.embed_tokens, *ends]
        return [UnitSpec("zero.root", [(names[id(m)], m) for m in mods], b.embed_tokens, head, (0, last_pos))] + specs
    if b.embed_tokens is not None:
        specs.insert(
            0,
            UnitSpec(
                "zero.embed", [(names[id(b.embed_tokens)], b.embed_tokens)], b.embed_tokens, b.embed_tokens, (0, 0)
            ),
        )
    if ends:
        specs.append(
            UnitSpec("zero.head", [(names[id(m)], m) for m in ends], ends[0], ends[-1], (last_pos - 1, last_pos))
        )
    return specs


class Zero3(ZeroBase[GatherUnit]):
    stage = 3
    collective_forward = True

    def __init__(
        self,
        model: nn.Module | list[nn.Module],
        groups: ShardGroups,
        stats: CommStats,
        param_dtype: torch.dtype = torch.float32,
        reduce_dtype: torch.dtype = torch.float32,
        offload: bool = False,
        prefetch: bool = True,
        experts: ExpertShards | None = None,
        zeropp: ZeroPP | None = None,
        weight_grads: WeightGradQueue | None = None,
    ) -> None:
        parts = as_parts(model)
        super().__init__(groups, stats, reduce_dtype, offload, next(parts[0].parameters()).device, experts)
        self.param_dtype, self.prefetch = param_dtype, prefetch
        self.zpp = zeropp or ZeroPP()
        self.live_bytes = self.peak_bytes = 0
        self.next_fwd: dict[int, int] = {}
        self.next_bwd: dict[int, int] = {}
        for part in parts:
            self._add_units(part)
        self.register_grad_hooks()
        self.unit_of = {id(p): u for u in self.units for p in u.layout.params}
        if weight_grads is not None:  # a zero-bubble schedule's W adds some gradients later
            weight_grads.watch(self)

    def _add_units(self, part: nn.Module) -> None:
        """Units of one Llama (the model, or one pipeline stage), hooked, prefetching among themselves."""
        seen: set[int] = set()
        specs, start = [], len(self.units)
        for spec in block_specs(cast(Llama, part)):  # ZeRO-3 cuts units along a Llama's structure
            # A module whose weights another unit already owns (tying) needs no unit. A block's experts
            # are a unit of their own (they shard over another group), gathered and freed with the rest
            # of the block: the same modules hook both, and the block's unit prefetches its experts'.
            for i, (named, shard_groups) in enumerate(self.by_groups(named_unique(spec.modules, seen))):
                specs.append(spec if i == 0 else replace(spec, name=f"{spec.name}.experts"))
                lay = FlatUnit(specs[-1].name, named, shard_groups.size, shard_groups.rank)
                self.units.append(self._build_unit(lay, len(self.units), shard_groups))
        self.next_fwd.update(following(specs, start, 0, reverse=False))
        self.next_bwd.update(following(specs, start, 1, reverse=True))
        for i, spec in enumerate(specs, start):
            spec.first.register_forward_pre_hook(partial(self._pre_forward, i))
            spec.last.register_forward_hook(partial(self._post_forward, i))

    def _build_unit(self, lay: FlatUnit, index: int, groups: ShardGroups) -> GatherUnit:
        full = lay.flatten([p.detach() for p in lay.params], torch.float32, self.device)
        shard = full[lay.shard].clone()
        compute = full if self.param_dtype == torch.float32 else full.to(self.param_dtype)
        for p, view in zip(lay.params, lay.views(compute)):
            p.data = view
        compute.untyped_storage().resize_(0)
        grad = torch.zeros(lay.shard_size, dtype=torch.float32, device=self.device)
        master = self.host_copy(shard) if self.offload else shard
        places = dist.get_world_size(self.zpp.intra) if self.zpp.intra is not None else 1
        secondary = None
        if self.zpp.hpz and groups.shard is not None:
            secondary = torch.zeros(lay.padded // places, dtype=self.param_dtype, device=self.device)
        return GatherUnit(
            lay,
            master,
            self.host_copy(grad) if self.offload else grad,
            full=compute,
            groups=groups,
            shard=shard,
            index=index,
            secondary=secondary,
        )

    # ---- gather / free ----------------------------------------------------------------------------
    def _start_gather(self, i: int, backward: bool = False) -> None:
        unit = self.units[i]
        if unit.state != "free":
            return
        nbytes = unit.layout.padded * unit.full.element_size()
        unit.full.untyped_storage().resize_(nbytes)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        unit.state = "inflight"
        real = unit.layout.real_bytes(unit.full.element_size())
        if backward and unit.secondary is not None and self.zpp.intra is not None:  # hpZ: inside the node
            unit.work, unit.refresh = all_gather(unit.full, unit.secondary, self.zpp.intra, self.stats, real), False
            return
        unit.refresh = unit.secondary is not None
        if self.zpp.qwz and unit.groups.shard is not None:
            unit.work = quantized_gather(unit.shard, unit.groups.shard, self.stats, self.zpp.block)
            return
        source = unit.shard if unit.shard.dtype == self.param_dtype else unit.shard.to(self.param_dtype)
        if unit.groups.shard is None:
            unit.full.copy_(source)
            return
        # Writing into storage that autograd's saved views share trips no version check: `p.data = view`
        # left each parameter its own version counter, which is the one its saved views carry.
        unit.work = all_gather(unit.full, source, unit.groups.shard, self.stats, real)
        unit.source = source

    def _unshard(self, i: int, backward: bool = False) -> None:
        unit = self.units[i]
        self._start_gather(i, backward)
        if unit.state == "inflight":
            if isinstance(unit.work, CompressedGather):
                unit.full.copy_(unit.work.wait())  # the decoded fp32 codes, cast to the compute dtype
            elif unit.work is not None:
                unit.work.wait()
            if unit.refresh and unit.secondary is not None:
                place = dist.get_rank(self.zpp.intra) if self.zpp.intra is not None else 0
                unit.secondary.copy_(unit.full.view(-1, unit.secondary.numel())[place])
            unit.work, unit.source, unit.state, unit.refresh = None, None, "ready", False

    def _free(self, i: int) -> None:
        unit = self.units[i]
        if unit.state == "free":
            return
        self._unshard(i)  # a gather still writing must land before its storage goes
        unit.full.untyped_storage().resize_(0)
        self.live_bytes -= unit.layout.padded * unit.full.element_size()
        unit.state = "free"

    def _prefetch(self, after: dict[int, int], i: int, backward: bool = False) -> None:
        if self.prefetch and i in after:
            self._start_gather(after[i], backward)

    # ---- hooks ------------------------------------------------------------------------------------
    def _pre_forward(self, i: int, module: nn.Module, args: Any) -> None:
        self._unshard(i)
        self._prefetch(self.next_fwd, i)

    def _post_forward(self, i: int, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._pre_backward, i))
        self._free(i)

    def _pre_backward(self, i: int, grad: torch.Tensor) -> None:
        self._unshard(i, backward=True)
        self._prefetch(self.next_bwd, i, backward=True)

    def counting(self) -> bool:
        return True  # every micro-step's gradients are reduced (see the module docstring)

    def unit_grads_ready(self, unit: GatherUnit) -> None:
        self._free(unit.index)
        if unit.queued:  # its B is done, but W still owes some gradients: reduce once they land
            unit.owed.append(unit.queued)
            unit.queued = 0
            return
        self._reduce_unit(unit)

    # ---- the WeightGradWatcher contract (meshtrain.core.weight_grads) -----------------------------
    def deferred(self, weight: nn.Parameter) -> None:
        self.unit_of[id(weight)].queued += 1

    def landed(self, weight: nn.Parameter) -> None:
        # A W runs all closures of one B, so the unit's count for that B reaches zero within it; every
        # B of a unit queues as many, so the oldest count serves whichever W of the unit runs first.
        unit = self.unit_of[id(weight)]
        if not unit.owed:
            raise RuntimeError(
                f"ZeRO-3 unit {unit.layout.name}: a W ran before its B was done; every parameter of the "
                f"unit must take part in the loss"
            )
        unit.owed[0] -= 1
        if unit.owed[0] == 0:
            unit.owed.popleft()
            self._reduce_unit(unit)

    def _reduce_unit(self, unit: GatherUnit) -> None:
        """Reduce-scatter what the unit's .grad holds into its fp32 shard, and drop it."""
        lay = unit.layout
        flat = lay.flatten([p.grad for p in lay.params], self.reduce_dtype, self.device)
        for p in lay.params:
            p.grad = None
        if self.zpp.qgz and unit.groups.shard is not None:
            mine = hierarchical_reduce_scatter(flat, self.zpp.intra, self.zpp.inter, self.stats, self.zpp.block)
            unit.grad_shard().add_(mine.to(unit.grad_shard().device))
            return
        self.reduce(unit, flat, unit.grad_shard(), "add")

    # ---- the GradEngine contract ------------------------------------------------------------------
    def finish(self) -> None:
        partial_units = [u.layout.name for u in self.units if u.ready]
        if partial_units:
            raise RuntimeError(
                f"ZeRO-3 units {partial_units} got gradients for only some of their parameters; "
                f"every parameter must take part in the loss"
            )
        unlanded = [u.layout.name for u in self.units if u.owed or u.queued]
        if unlanded:
            raise RuntimeError(f"ZeRO-3 units {unlanded} still wait for deferred weight gradients: a B had no W")
        self.drain()
        self.all_reduce_replicas()
        self.finish_units()

    def after_step(self) -> None:
        if self.offload:
            self.masters_changed()

    def masters_changed(self) -> None:
        for unit in self.units:
            if unit.shard is not unit.master:
                unit.shard.copy_(unit.master)

    def zero_grad(self) -> None:
        for unit in self.units:
            unit.grad_shard().zero_()

    def held(self) -> dict[str, Sequence[torch.Tensor | None]]:
        # `full` is counted too: its storage is empty between uses, so it adds nothing at a step's end
        return {
            "params": [u.shard for u in self.units] + [u.full for u in self.units],
            "grads": [u.grad for u in self.units],
            "host master": [u.master for u in self.units] if self.offload else [],
            "hpZ secondary": [u.secondary for u in self.units],
        }

    def traffic(self) -> str:
        psi, z = self.num_params(), self.zpp
        gathered = human_bytes(psi * (1 if z.qwz else self.units[0].full.element_size()))
        backward = "within the node (hpZ)" if z.hpz else "again in backward"
        reduced = human_bytes(psi * (0.5 if z.qgz else self.reduce_dtype.itemsize))
        how = "int4 all-to-all in the node, then across nodes (qgZ)" if z.qgz else "reduce-scatter"
        codes = f" ({z.describe()}: codes plus one fp32 scale per {z.block} elements)" if z.qwz or z.qgz else ""
        return f"per micro-step all-gather {gathered} in forward and {backward}, {how} {reduced}{codes}"

    def step_metrics(self) -> dict[str, float]:
        """Peak bytes of gathered parameters during the step, next to the largest unit's size."""
        out: dict[str, float] = {
            "zero3_peak_gathered_bytes": self.peak_bytes,
            "zero3_unit_bytes_max": max(u.layout.padded for u in self.units) * self.units[0].full.element_size(),
        }
        self.peak_bytes = self.live_bytes
        return out
