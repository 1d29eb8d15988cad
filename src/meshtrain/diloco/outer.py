"""DiLoCo's outer loop: every H inner steps the islands average how far they moved and take one
Nesterov step together (Douillard et al. 2023), optionally fragment by fragment (Streaming DiLoCo)
and one round late (the overlapped, delay-1 variant). docs/diloco.md has the timeline.

Per rank it works on what this rank's inner optimizer updates (`engine.optim_params()`: whole
parameters under plain DP, fp32 master shards under ZeRO), so it composes with every inner layout:
the rank at the same place of every island holds the same slice of the model, and the outer group
joins exactly those ranks. Ranks that hold the same slice inside an island (data-parallel replicas)
split it further, so each element crosses between islands once per sync, not once per replica.

Per fragment f, in host memory: g (the global parameters: the last outer result) and m (the outer
momentum). At f's sync, with θ the island's current parameters of f:
    Δ = g − θ;  Δ̄ = mean over islands (meshtrain.diloco.comm);  m ← μm + Δ̄;  g ← g − lr(Δ̄ + μm);  θ ← g
With overlap, the island keeps its round's progress: Δ = s − θ (s: where its round started), Δ̄ is
launched in the background, the previous sync's Δ̄ (none at the first) is applied to g, and
θ ← s ← g − Δ. The last step applies the mean still in flight, so the run ends with the islands equal.
The inner optimizer's state stays local and untouched.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from meshtrain.accounting import KINDS, CommStats, Recorder, human_bytes, tensor_bytes
from meshtrain.core import comm
from meshtrain.diloco.comm import mean_over_islands

LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class OuterSettings:
    inner_steps: int
    lr: float
    momentum: float
    codec: str
    block: int
    fragments: int
    overlap: bool
    island: int
    total_steps: int
    """The run's last step: a mean still in flight then is waited for, so no thread outlives the run."""

    @property
    def every(self) -> int:
        """Steps between two syncs (of consecutive fragments)."""
        return self.inner_steps // self.fragments

    def fragment_at(self, step: int) -> int | None:
        """The fragment that syncs after inner step `step` (1-based), or None."""
        if step % self.every:
            return None
        return (step // self.every - 1) % self.fragments


class OuterGroup(Protocol):
    """Who the outer mean is taken over: a fixed mesh axis, or an elastic quorum (meshtrain.diloco.membership)."""

    def mean(self, delta: torch.Tensor, step: int, stats: Recorder, codec: str, block: int) -> torch.Tensor:
        """The mean of this place's pseudo-gradient over the islands of the sync after inner step `step`
        (meshtrain.diloco.comm codecs); every island of that sync gets the same tensor."""
        ...

    def start(self, step: int, state: list[torch.Tensor]) -> int:
        """Before the first step: the step this island continues from. An island that joins a live run
        fills `state` (the outer state, in DiLoCo.state_tensors order) from a peer and returns the
        run's step; otherwise `step` unchanged."""
        ...


@dataclass
class FixedIslands:
    """Every island in one launch: the outer group is the mesh's diloco axis, membership fixed."""

    group: dist.ProcessGroup | None

    def mean(self, delta: torch.Tensor, step: int, stats: Recorder, codec: str, block: int) -> torch.Tensor:
        return mean_over_islands(delta, self.group, stats, codec, block)

    def start(self, step: int, state: list[torch.Tensor]) -> int:
        return step


def fragment_of(name: str, fragments: int) -> int:
    """Layer i belongs to fragment i mod F (strided, as in Streaming DiLoCo); the rest to fragment 0."""
    found = LAYER.search(name)
    return int(found.group(1)) % fragments if found else 0


class Fragment:
    """One fragment of this rank's optimizer parameters, with its outer state (this replica's slice)."""

    def __init__(self, tensors: list[torch.Tensor], replica_rank: int, replicas: int, overlap: bool) -> None:
        self.tensors = tensors
        self.numel = sum(t.numel() for t in tensors)
        self.padded = math.ceil(self.numel / replicas) * replicas
        width = self.padded // replicas
        self.lo, self.hi = replica_rank * width, min((replica_rank + 1) * width, self.numel)
        self.width = width
        n = max(0, self.hi - self.lo)
        self.g = torch.zeros(n, dtype=torch.float32)
        self.m = torch.zeros(n, dtype=torch.float32)
        late = n if overlap else 0  # the delay-1 variant's buffers; empty otherwise, so they hold no memory
        self.arrived = torch.zeros(late, dtype=torch.float32)
        """With overlap: the last mean that came in and is not applied yet."""
        self.start = torch.zeros(late, dtype=torch.float32)
        """With overlap: this island's parameters where its current round began (its own: islands differ)."""
        self.has_arrived = torch.zeros((), dtype=torch.int64)
        self.inflight: Future[tuple[torch.Tensor, CommStats]] | None = None

    def flat(self) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).float() for t in self.tensors])

    def mine(self) -> torch.Tensor:
        """This replica's slice of the fragment's current parameters, on the host in fp32."""
        return self.flat()[self.lo : self.hi].cpu()

    def write(self, full: torch.Tensor) -> None:
        offset = 0
        for t in self.tensors:
            t.data.copy_(full[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def collect(self, into: CommStats) -> None:
        """Take the in-flight mean, if any, as arrived; its bytes count from this step on (the thread
        counted them apart, so that no step's figures depend on when the thread ran)."""
        if self.inflight is not None:
            mean, counted = self.inflight.result()
            self.arrived.copy_(mean)
            self.has_arrived.fill_(1)
            into.absorb(counted)
            self.inflight = None


class DiLoCo:
    """The outer loop, as a step hook (meshtrain.core.runner.StepHook) the trainer calls after every
    inner optimizer step: it syncs the fragment whose turn it is, and reports comm_outer_* bytes."""

    def __init__(
        self,
        params: list[tuple[str, torch.Tensor]],
        settings: OuterSettings,
        islands: OuterGroup,
        replicas: dist.ProcessGroup | None,
        position: int,
        stats: Recorder,
        outer_stats: CommStats,
        refresh: Callable[[], None] | None = None,
    ) -> None:
        """`refresh`: what the trainer does after an optimizer step changed the optimizer's tensors
        (the engine's after_step, e.g. ZeRO's all-gather), for the outer step a joining island takes
        before its first inner step."""
        self.refresh = refresh
        self.s, self.islands, self.replicas, self.stats, self.outer_stats = (
            settings,
            islands,
            replicas,
            stats,
            outer_stats,
        )
        r = dist.get_world_size(replicas) if replicas is not None else 1
        me = dist.get_rank(replicas) if replicas is not None else 0
        groups: list[list[torch.Tensor]] = [[] for _ in range(settings.fragments)]
        for name, tensor in params:
            groups[fragment_of(name, settings.fragments)].append(tensor)
        self.fragments = [Fragment(ts, me, r, settings.overlap) for ts in groups]
        self.position = position
        self.started = torch.zeros((), dtype=torch.int64)
        """1 once g holds the starting parameters (captured before the first step, or loaded)."""
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="diloco-outer") if settings.overlap else None
        self.figures: dict[str, Any] = {}
        self.waited = self.spanned = 0.0
        self.last: float | None = None

    # ---- the step hook ---------------------------------------------------------------------
    def start_step(self, step: int) -> int:
        """Before the first step (after any resume): a joining island adopts the live run's outer
        state and step, and sets its parameters to the global ones."""
        found = self.islands.start(step, [self.started, *self.state_tensors()])
        if found != step:
            for frag in self.fragments:
                self._broadcast(frag, frag.g)
            # the sync it joined is under way: with θ = g its pseudo-gradient is zero, and the outer
            # step it takes with the others leaves it with their parameters
            f = self.s.fragment_at(found)
            if f is not None:
                self._sync(self.fragments[f], found)
            if self.refresh is not None:
                self.refresh()
        return found

    def before_step(self, applied: bool) -> None:
        if not int(self.started):  # the parameters the run starts from: after init, a fine-tune's load or a join
            for frag in self.fragments:
                frag.g.copy_(frag.mine())
                if self.pool is not None:
                    frag.start.copy_(frag.g)
            self.started.fill_(1)

    def after_optimizer(self, step: int) -> bool:
        """Sync the fragment whose turn it is after inner step `step`; True when parameters changed."""
        start = time.perf_counter()
        f = self.s.fragment_at(step)
        if f is not None:
            self._sync(self.fragments[f], step)
        flushed = step == self.s.total_steps and self.pool is not None
        if flushed:  # the means still in flight: applied, so the run ends with its last rounds in g
            for frag in self.fragments:
                self._flush(frag)
        wait = time.perf_counter() - start
        self._account(f, wait)
        return f is not None or flushed

    def _sync(self, frag: Fragment, step: int) -> None:
        if self.pool is None:
            delta = frag.g - frag.mine()
            self._apply(frag, self.islands.mean(delta, step, self.outer_stats, self.s.codec, self.s.block))
            self._broadcast(frag, frag.g)
            return
        delta = self._rebase(frag)
        frag.inflight = self.pool.submit(self._mean_apart, delta, step)

    def _mean_apart(self, delta: torch.Tensor, step: int) -> tuple[torch.Tensor, CommStats]:
        counted = CommStats(self.outer_stats.node_size, self.outer_stats.rank)
        counted.log.link = self.outer_stats.log.link
        return self.islands.mean(delta, step, counted, self.s.codec, self.s.block), counted

    def _rebase(self, frag: Fragment) -> torch.Tensor:
        """Overlap: apply the mean that arrived (if any) to g and put this island at g plus its round's
        own progress (θ ← s ← g − (s − θ)); returns that progress, Δ = s − θ."""
        delta = frag.start - frag.mine()
        frag.collect(self.outer_stats)
        if int(frag.has_arrived):
            self._apply(frag, frag.arrived)
            frag.has_arrived.fill_(0)
        frag.start.copy_(frag.g - delta)
        self._broadcast(frag, frag.start)
        return delta

    def _flush(self, frag: Fragment) -> None:
        """After the last step: the mean in flight, if any, applied now (re-based like a sync)."""
        if frag.inflight is not None or int(frag.has_arrived):
            self._rebase(frag)

    def _apply(self, frag: Fragment, mean: torch.Tensor) -> None:
        """One Nesterov SGD step on g (torch.optim.SGD's rule: dampening 0, no weight decay)."""
        frag.m.mul_(self.s.momentum).add_(mean)
        frag.g.sub_(mean + self.s.momentum * frag.m, alpha=self.s.lr)

    def _broadcast(self, frag: Fragment, values: torch.Tensor) -> None:
        """θ ← values (g, or g less this round's progress) on this island: each replica contributes its slice."""
        device = frag.tensors[0].device
        if self.replicas is None:
            frag.write(values.to(device))
            return
        mine = torch.zeros(frag.width, dtype=torch.float32, device=device)
        mine[: values.numel()] = values.to(device)
        full = torch.empty(frag.padded, dtype=torch.float32, device=device)
        comm.all_gather(full, mine, self.replicas, self.stats)
        frag.write(full)

    def _account(self, fragment: int | None, wait: float) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.spanned += now - self.last
            self.waited += wait
        self.last = now
        outer = self.outer_stats.snapshot_and_reset()
        self.figures = {
            "island": self.s.island,
            "outer_fragment": -1 if fragment is None else fragment,
            "outer_wait_s": wait if fragment is not None else 0.0,
            "comm_outer_wire_bytes": outer["comm_wire_bytes"],
            "comm_outer_payload_bytes": sum(outer[f"comm_{kind}_bytes"] for kind in KINDS),
            "compute_utilization": 1.0 - self.waited / self.spanned if self.spanned > 0 else 1.0,
            "mem_outer_state_bytes": tensor_bytes(self.state_tensors()),
        }

    def metrics(self) -> dict[str, Any]:
        return dict(self.figures)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The outer state, the same on every island (so a checkpoint holds it once per place)."""
        out: dict[str, torch.Tensor] = {f"diloco.place{self.position}.started": self.started}
        for i, frag in enumerate(self.fragments):
            frag.collect(self.outer_stats)  # a mean still in flight is part of the state
            key = f"diloco.place{self.position}.fragment{i}"
            out |= {f"{key}.global": frag.g, f"{key}.momentum": frag.m}
            if self.s.overlap:  # where this island's round began is its own
                own = f"diloco.island{self.s.island}.place{self.position}.fragment{i}.start"
                out |= {f"{key}.arrived": frag.arrived, f"{key}.has_arrived": frag.has_arrived, own: frag.start}
        return out

    @contextlib.contextmanager
    def outside_training(self) -> Iterator[None]:
        yield

    def describe(self) -> str:
        s = self.s
        how = (
            f"{s.fragments} fragments, one every {s.every} steps" if s.fragments > 1 else f"every {s.inner_steps} steps"
        )
        return (
            f"DiLoCo island {s.island}: outer Nesterov step (lr {s.lr:g}, momentum {s.momentum:g}) {how}, "
            f"pseudo-gradients in {s.codec}{', overlapped (delay 1)' if s.overlap else ''}; outer state "
            f"{human_bytes(tensor_bytes(self.state_tensors()))} in host memory on this rank"
        )

    def state_tensors(self) -> list[torch.Tensor]:
        """The outer state this rank holds in host memory (g, m and, with overlap, the arrived mean and
        where the round began, per fragment)."""
        extra = (lambda f: (f.arrived, f.start)) if self.s.overlap else (lambda f: ())
        return [t for frag in self.fragments for t in (frag.g, frag.m, *extra(frag))]
