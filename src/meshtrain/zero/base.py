"""What ZeRO 1, 2 and 3 share: flat units (the layout that is sharded), fp32 master and gradient
shards per unit, their reduction, the optimizer-facing half of the GradEngine contract
(meshtrain.core.engine), and the checkpoint views that gather shards into full tensors by name.

Flat units: a unit's parameters sit end to end in one flat buffer, padded at the end to a multiple
of the shard-group size N, so that every rank owns one equal, contiguous slice (its shard) and the
single-tensor collectives can move it. A parameter may straddle two shards; the part of it inside
this rank's shard is a `Piece`. The optimizer steps pieces named after their parameter, so its state
is keyed by parameter name whatever the unit layout: that is what lets a checkpoint written with one
stage or shard count load into another.

Every stage ends a backward with the same thing: for each unit, this rank's fp32 shard of the summed
gradient (`Unit.grad`), next to its fp32 master shard (`Unit.master`). The optimizer steps the
pieces of those shards, named after their parameters. The stages differ only in where the full
parameters and gradients live in between, which the subclasses own.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from meshtrain.accounting import CommStats, human_bytes, tensor_bytes
from meshtrain.core import comm
from meshtrain.core.comm import TrackedWork
from meshtrain.zero.comm import all_reduce, gather_uncounted, reduce_scatter


@dataclass(frozen=True)
class Piece:
    """The elements [param_start, param_start + numel) of a flattened parameter, at `start` in a shard."""

    name: str
    start: int
    param_start: int
    numel: int


class FlatUnit:
    """Where each parameter of a unit lives in the padded flat buffer, and which part this rank owns."""

    def __init__(self, name: str, named: list[tuple[str, nn.Parameter]], world: int, rank: int) -> None:
        if not named:
            raise ValueError(f"flat unit {name} has no parameters")
        self.name = name
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.offsets = list(itertools.accumulate([0] + self.numels[:-1]))
        self.numel = sum(self.numels)
        self.world, self.rank = world, rank
        self.shard_size = -(-self.numel // world)
        self.padded = self.shard_size * world
        self.lo = rank * self.shard_size
        self.pieces = self._pieces()

    def _pieces(self) -> list[Piece]:
        hi = self.lo + self.shard_size
        out = []
        for name, off, n in zip(self.names, self.offsets, self.numels):
            a, b = max(off, self.lo), min(off + n, hi)
            if a < b:
                out.append(Piece(name, a - self.lo, a - off, b - a))
        return out

    @property
    def shard(self) -> slice:
        return slice(self.lo, self.lo + self.shard_size)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's view into a full (padded) flat buffer."""
        return [flat[o : o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes)]

    def piece_views(self, shard: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(parameter name, view) of every piece of a shard-sized tensor; padding belongs to no piece."""
        return [(p.name, shard[p.start : p.start + p.numel]) for p in self.pieces]

    def flatten(self, tensors: list[torch.Tensor | None], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A new padded flat buffer holding `tensors` end to end; None (no gradient) and padding are zeros."""
        out = torch.empty(self.padded, dtype=dtype, device=device)
        views = self.views(out)
        pairs = [(v, t) for v, t in zip(views, tensors) if t is not None]
        if pairs:
            torch._foreach_copy_([v for v, _ in pairs], [t for _, t in pairs])
        for v, t in zip(views, tensors):
            if t is None:
                v.zero_()
        out[self.numel :].zero_()
        return out

    def real_bytes(self, element_size: int) -> int:
        """Unpadded bytes of the whole unit: what its collectives are charged."""
        return self.numel * element_size


def named_unique(modules: list[tuple[str, nn.Module]], seen: set[int]) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters of (prefix, module) pairs not yet in `seen` (tied weights once), with full names."""
    out = []
    for prefix, module in modules:
        for name, p in module.named_parameters(prefix=prefix):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
    return out


# ---- checkpoint views ----------------------------------------------------------------------------
# torch.distributed.checkpoint (DCP) treats an object with `state_dict()` and `load_state_dict()` as
# Stateful: it saves what `state_dict()` returns, and on load it fills those tensors in place and hands
# them back through `load_state_dict()`. Both views answer `state_dict()` with full, unsharded tensors
# gathered from the shard group, shaped like the parameters, exactly what plain data parallelism
# saves. Every rank of the group then holds the same tensors and DCP writes each once. On load, each
# rank copies back only the elements of its own shard. A checkpoint therefore moves freely between
# ZeRO stages, shard counts and plain DP, at the price of one full copy of the model (and of the Adam
# moments, while saving) per rank: fine for the models a CPU trains, and the place to switch to
# DTensor-sharded saves for large ones.

KINDS = ("exp_avg", "exp_avg_sq")


class ModelState:
    """Stateful: the model's parameters, gathered to full tensors for a save, scattered back on load."""

    def __init__(
        self,
        gather: Callable[[], dict[str, torch.Tensor]],
        scatter: Callable[[Mapping[str, torch.Tensor]], None],
    ) -> None:
        self._gather, self._scatter = gather, scatter

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._gather()

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        self._scatter(sd)

    def load_by_name(self, fetch: Callable[[str], torch.Tensor]) -> None:
        """Load from full tensors fetched one name at a time (a Hugging Face import): each rank copies
        the pieces of its shards, and holds no more than one full tensor at a time, never the model."""
        self._scatter(_OneAtATime(fetch))


class _OneAtATime(Mapping[str, torch.Tensor]):
    """The full tensor of the name asked for last; the scatter reads each parameter's pieces in a row."""

    def __init__(self, fetch: Callable[[str], torch.Tensor]) -> None:
        self._fetch = fetch
        self._name: str | None = None
        self._value = torch.empty(0)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name != self._name:
            self._name, self._value = name, self._fetch(name)
        return self._value

    def __iter__(self) -> Iterator[str]:
        raise TypeError("tensors are fetched by name only")

    def __len__(self) -> int:
        raise TypeError("tensors are fetched by name only")


class OptimState(dict):
    """The optimizer's own state dict (per-piece moments, 'steps'), which DCP sees, through the
    Stateful methods, as full per-parameter moments. It stays a dict so that AdamW.load_state_dict
    can read the restored step count from it."""

    def __init__(
        self,
        local: dict[str, torch.Tensor],
        units: list[tuple[FlatUnit, dist.ProcessGroup | None]],
        device: torch.device,
        stats: CommStats,
    ) -> None:
        super().__init__(local)
        self._units, self._device, self._stats = units, device, stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"steps": self["steps"]}
        for unit, group in self._units:
            for kind in KINDS:
                shard = torch.zeros(unit.shard_size, dtype=torch.float32, device=self._device)
                for name, view in unit.piece_views(shard):
                    view.copy_(self[f"{kind}.{name}"])
                full = torch.empty(unit.padded, dtype=torch.float32, device=self._device)
                gather_uncounted(full, shard, group, self._stats)
                out.update((f"{kind}.{n}", v.clone()) for n, v in zip(unit.names, unit.views(full)))
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for unit, _ in self._units:
            for piece in unit.pieces:
                for kind in KINDS:
                    flat = sd[f"{kind}.{piece.name}"].reshape(-1)
                    self[f"{kind}.{piece.name}"].copy_(flat[piece.param_start : piece.param_start + piece.numel])
        self["steps"] = sd["steps"]


# Reductions in flight before the oldest is waited for: enough to overlap one unit's reduction with
# the next unit's backward, few enough that unsharded gradients never pile up.
IN_FLIGHT = 2


@dataclass
class ShardGroups:
    """The dp_shard group the state is split over and the dp_replicate group it is copied across (HSDP)."""

    shard: dist.ProcessGroup | None
    replicate: dist.ProcessGroup | None

    @property
    def size(self) -> int:
        return dist.get_world_size(self.shard) if self.shard is not None else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.shard) if self.shard is not None else 0

    @property
    def replicas(self) -> int:
        return dist.get_world_size(self.replicate) if self.replicate is not None else 1


@dataclass(eq=False)
class Unit:
    layout: FlatUnit
    master: torch.Tensor
    """fp32 shard the optimizer steps; a view of the parameters' own storage when nothing else is needed."""
    grad: torch.Tensor | None
    """fp32 shard of the summed gradient, as the optimizer reads it."""
    full: torch.Tensor
    """The padded flat parameters the model computes with (ZeRO-3: storage freed outside use)."""
    groups: ShardGroups
    """Where this unit is sharded and replicated: dp_shard x cp, or for experts their edp_shard group."""
    grad_full: torch.Tensor | None = None
    """ZeRO-1's persistent padded gradient bucket; param.grad are views into it."""
    ready: int = 0
    launched: bool = False

    def grad_shard(self) -> torch.Tensor:
        """`grad` where it must exist: from finish() on (offloaded ZeRO-1 drops it in zero_grad())."""
        if self.grad is None:
            raise RuntimeError(f"{self.layout.name} has no gradient shard: it exists from finish() to zero_grad()")
        return self.grad


@dataclass
class Pending:
    """A reduce-scatter in flight: `out` lands in `target` by `mode` (alias: already there)."""

    unit: Unit
    work: TrackedWork | None
    out: torch.Tensor
    target: torch.Tensor
    mode: str
    keep: torch.Tensor = field(repr=False)  # the input buffer, alive until the work completes


@dataclass(frozen=True)
class ExpertShards:
    """Expert parallelism's parameters: their state is sharded over the ranks that hold the same
    experts (edp_shard), not over the dense group, whose other ranks hold other experts."""

    names: set[str]
    groups: ShardGroups


U = TypeVar("U", bound=Unit)
P = TypeVar("P")


class ZeroBase(Generic[U]):
    """Generic in its unit type, so that a stage's own Unit subclass (ZeRO-3's GatherUnit) stays typed."""

    stage = 0
    collective_forward = False

    def __init__(
        self,
        groups: ShardGroups,
        stats: CommStats,
        reduce_dtype: torch.dtype,
        offload: bool,
        device: torch.device,
        experts: ExpertShards | None = None,
    ) -> None:
        self.groups, self.stats, self.experts = groups, stats, experts
        self.reduce_dtype, self.offload, self.device = reduce_dtype, offload, device
        self.units: list[U] = []
        self.pending: deque[Pending] = deque()
        self.sync = True

    # ---- construction helpers -------------------------------------------------------------------
    def by_groups(self, named: list[tuple[str, P]]) -> list[tuple[list[tuple[str, P]], ShardGroups]]:
        """`named` cut into the dense parameters and the experts', each with the groups its units
        shard over (a flat unit lives in one group); empty parts left out."""
        if self.experts is None:
            return [(named, self.groups)] if named else []
        names = self.experts.names
        dense, experts = [x for x in named if x[0] not in names], [x for x in named if x[0] in names]
        return [(x, g) for x, g in ((dense, self.groups), (experts, self.experts.groups)) if x]

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """An fp32 copy on the host (pinned, when there is a GPU to copy from) for offloaded state."""
        out = torch.empty(t.shape, dtype=torch.float32, pin_memory=t.device.type == "cuda")
        return out.copy_(t)

    def register_grad_hooks(self) -> None:
        for unit in self.units:
            for p in unit.layout.params:
                p.register_post_accumulate_grad_hook(partial(self._on_grad, unit))

    def _on_grad(self, unit: U, _: torch.Tensor) -> None:
        if not self.counting():
            return
        unit.ready += 1
        if unit.ready == len(unit.layout.params):
            unit.ready = 0
            self.unit_grads_ready(unit)

    def counting(self) -> bool:
        """Whether this backward's gradients are reduced as they arrive."""
        return self.sync

    def unit_grads_ready(self, unit: U) -> None:
        raise NotImplementedError

    # ---- reduction --------------------------------------------------------------------------------
    def reduce(self, unit: Unit, flat: torch.Tensor, target: torch.Tensor, mode: str) -> None:
        """Reduce-scatter a padded full-gradient buffer; this rank's slice goes to `target` by `mode`
        ('alias': the output is `target` itself, 'copy' or 'add')."""
        if flat.dtype != self.reduce_dtype:
            flat, mode = flat.to(self.reduce_dtype), "copy" if mode == "alias" else mode
        out, group = flat[unit.layout.shard], unit.groups.shard
        work = None
        if group is not None:
            work = reduce_scatter(out, flat, group, self.stats, unit.layout.real_bytes(flat.element_size()))
        self.pending.append(Pending(unit, work, out, target, mode, flat))
        unit.launched = True
        self.drain(IN_FLIGHT)

    def drain(self, keep: int = 0) -> None:
        while len(self.pending) > keep:
            p = self.pending.popleft()
            if p.work is not None:
                p.work.wait()
            if p.mode == "copy":
                p.target.copy_(p.out)
            elif p.mode == "add":
                p.target.add_(p.out.to(p.target.device))

    def all_reduce_replicas(self) -> None:
        """HSDP: the shard group's sums are partial; add the replicas' once per optimizer step."""
        replicate = self.groups.replicate  # experts are replicated over the same dp_replicate group
        if replicate is None:
            return
        grads = [u.grad_shard() for u in self.units]
        bufs = [g if g.dtype == self.reduce_dtype else g.to(self.reduce_dtype) for g in grads]
        works = []
        for unit, buf in zip(self.units, bufs):
            share = unit.layout.real_bytes(buf.element_size()) / unit.groups.size
            works.append(all_reduce(buf, replicate, self.stats, share))
        for grad, buf, work in zip(grads, bufs, works):
            work.wait()
            if buf is not grad:
                grad.copy_(buf)

    def finish_units(self) -> None:
        for unit in self.units:
            unit.launched, unit.ready = False, 0

    # ---- the GradEngine contract (meshtrain.engine) ---------------------------------------------
    def set_sync(self, sync: bool) -> None:
        self.sync = sync

    def optim_params(self) -> list[tuple[str, torch.Tensor]]:
        return [pv for u in self.units for pv in u.layout.piece_views(u.master)]

    def optim_grads(self) -> list[torch.Tensor]:
        return [v for u in self.units for _, v in u.layout.piece_views(u.grad_shard())]

    def no_decay(self) -> set[str]:
        return {n for u in self.units for n, s in zip(u.layout.names, u.layout.shapes) if len(s) < 2}

    @property
    def shard_group(self) -> dist.ProcessGroup | None:
        return self.groups.shard

    def grad_norm(self) -> torch.Tensor:
        # Padding is zero in every shard, and each element lives in exactly one shard of the group. An
        # expert's element lives in one shard of its edp_shard group, whose product with the ep group
        # (the ranks holding the other experts) is the dense group: one sum over it counts each once.
        sq = torch.stack([u.grad_shard().double().square().sum() for u in self.units]).sum().to(self.device)
        if self.groups.shard is not None:
            comm.all_reduce(sq, self.groups.shard, self.stats, counted=False)
        return sq.sqrt().float()

    def scale_grads(self, factor: float) -> None:
        torch._foreach_mul_([u.grad_shard() for u in self.units], factor)

    def num_params(self) -> int:
        return sum(u.layout.numel for u in self.units)

    def model_state_dict(self) -> ModelState:
        return ModelState(self.full_params, self.load_full_params)

    def optim_state_dict(self, optim_sd: dict[str, torch.Tensor]) -> OptimState:
        return OptimState(optim_sd, [(u.layout, u.groups.shard) for u in self.units], self.device, self.stats)

    def step_metrics(self) -> dict[str, float]:
        return {}

    # ---- checkpoints: full tensors per parameter name --------------------------------------------
    def full_params(self) -> dict[str, torch.Tensor]:
        """Every parameter, unsharded and fp32, from the master shards (a collective; not counted as traffic)."""
        out: dict[str, torch.Tensor] = {}
        for unit in self.units:
            lay = unit.layout
            full = torch.empty(lay.padded, dtype=torch.float32, device=self.device)
            gather_uncounted(full, unit.master.to(self.device), unit.groups.shard, self.stats)
            out.update((n, v.clone()) for n, v in zip(lay.names, lay.views(full)))
        return out

    def load_full_params(self, full: Mapping[str, torch.Tensor]) -> None:
        for unit in self.units:
            for piece, (_, view) in zip(unit.layout.pieces, unit.layout.piece_views(unit.master)):
                view.copy_(full[piece.name].reshape(-1)[piece.param_start : piece.param_start + piece.numel])
        self.masters_changed()

    def masters_changed(self) -> None:
        """Bring the parameters the model computes with up to date with the master shards."""
        raise NotImplementedError

    # ---- accounting -------------------------------------------------------------------------------
    def held(self) -> dict[str, Sequence[torch.Tensor | None]]:
        """This rank's model-state tensors by kind: params, grads, and a host master when it is a copy."""
        raise NotImplementedError

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for tensors in self.held().values() for t in tensors if t is not None]

    def traffic(self) -> str:
        """The collectives of one optimizer step, in words and bytes."""
        raise NotImplementedError

    def describe(self) -> str:
        n, lay = self.groups.size, [u.layout for u in self.units]
        hsdp = f" x {self.groups.replicas} replicas (HSDP)" if self.groups.replicas > 1 else ""
        held = {k: tensor_bytes(v) for k, v in self.held().items() if tensor_bytes(v)}
        held["Adam"] = 8 * sum(p.numel for x in lay for p in x.pieces)
        parts = " + ".join(f"{k} {human_bytes(v)}" for k, v in held.items())
        shares = sum(u.layout.numel / u.groups.size for u in self.units)
        replicas = (
            f", all-reduce {human_bytes(self.reduce_dtype.itemsize * shares)} over replicas once"
            if self.groups.replicas > 1
            else ""
        )
        experts = f", experts over edp_shard={self.experts.groups.size}" if self.experts is not None else ""
        return (
            f"ZeRO-{self.stage} over dp_shard={n}{hsdp}{experts}: {len(lay)} flat units (largest "
            f"{human_bytes(4 * max(x.padded for x in lay))}), {sum(x.padded - x.numel for x in lay)} padding elements; "
            f"offload {'on' if self.offload else 'off'}\n"
            f"  model states per rank: {parts} = {human_bytes(sum(held.values()))}\n"
            f"  traffic per step: {self.traffic()}{replicas}"
        )
