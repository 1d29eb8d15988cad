"""Byte accounting for memory and communication, reported per rank per step.

Communication convention (shared with the planner, meshtrain.planner.predict_run):
- payload bytes: all_reduce counts the tensor reduced; reduce_scatter the full (unsharded) input;
  all_gather the full (gathered) output; p2p the tensor sent.
- wire bytes: what a ring algorithm makes each rank send: 2(n-1)/n of the payload for all_reduce,
  (n-1)/n for reduce_scatter, all_gather and all_to_all, all of it for p2p.
Scalar bookkeeping reductions (the logged loss, the grad norm) are not counted: they are not part of
any strategy's theoretical volume.

Inter-node bytes (comm_inter_node_bytes): of a rank's wire bytes, those it sends to a rank on another
node, nodes being blocks of `node_size` consecutive global ranks. The ring model again decides: a
ring collective's rank sends all its wire bytes to its successor (the next group rank), so only a
rank whose successor sits on another node sends off-node; an all-to-all sends 1/n of its payload to
each member; point-to-point goes to its peer. Summed over a node's ranks, that is the traffic on
the node's link (ZeRO++'s figure of merit).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "p2p", "broadcast")


def wire_factor(kind: str, n: int) -> float:
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n
    if kind in ("reduce_scatter", "all_gather", "all_to_all", "broadcast"):
        return (n - 1) / n
    return 1.0


def inter_node_factor(kind: str, ranks: tuple[int, ...], me: int, node_size: int) -> float:
    """The share of a collective's payload that global rank `me` sends off its node (module docstring);
    `ranks` are the group's global ranks in group order (for p2p: sender and receiver)."""
    n = len(ranks)
    if n < 2 or node_size < 1 or me not in ranks:
        return 0.0
    node = me // node_size
    if kind == "all_to_all":
        return sum(1 for r in ranks if r // node_size != node) / n
    successor = ranks[(ranks.index(me) + 1) % n]
    return wire_factor(kind, n) if successor // node_size != node else 0.0


class Recorder(Protocol):
    """Where the communication layer counts and logs a collective: CommStats, or a tee of several."""

    log: CollectiveLog

    def record(self, kind: str, nbytes: float, group_size: int, ranks: tuple[int, ...] = ()) -> None: ...


class CommStats:
    """Counts the bytes this rank hands to collectives, and logs the calls (meshtrain.core.comm);
    one instance per run, passed explicitly."""

    def __init__(self, node_size: int = 0, rank: int = 0) -> None:
        # float: HSDP's all_reduce records each rank's 1/N share of a unit, which need not be whole
        self.payload: dict[str, float] = defaultdict(int)
        self.wire = 0.0
        self.inter_node = 0.0
        self.node_size, self.rank = node_size, rank
        """Ranks per node and this rank's global rank, for inter-node bytes (0: not split)."""
        self.log = CollectiveLog()

    def record(self, kind: str, nbytes: float, group_size: int, ranks: tuple[int, ...] = ()) -> None:
        self.payload[kind] += nbytes
        self.wire += nbytes * wire_factor(kind, group_size)
        if self.node_size and ranks:
            self.inter_node += nbytes * inter_node_factor(kind, ranks, self.rank, self.node_size)

    def absorb(self, other: CommStats) -> None:
        """Add what `other` counted (traffic counted apart, on another thread) to this one."""
        for kind, nbytes in other.payload.items():
            self.payload[kind] += nbytes
        self.wire += other.wire
        self.inter_node += other.inter_node

    def snapshot_and_reset(self) -> dict[str, float]:
        out: dict[str, float] = {f"comm_{k}_bytes": self.payload.get(k, 0) for k in KINDS}
        out["comm_wire_bytes"] = round(self.wire)
        out["comm_inter_node_bytes"] = round(self.inter_node)
        self.payload.clear()
        self.wire = self.inter_node = 0.0
        return out


RECENT = 64  # entries kept in the log: enough to see where the ranks diverged


@dataclass(frozen=True)
class SlowLink:
    """An emulated network link ([comm] emulate_*): a collective whose group it covers takes latency
    plus its wire bytes (the ring model's share of the tensor, `wire_factor`) over the bandwidth.
    Nodes are blocks of `node_size` consecutive global ranks; with scope "inter-node" only groups
    that span two nodes are slowed, so that one machine can pose as several joined by a slow network."""

    gbps: float
    latency_ms: float
    node_size: int
    scope: str = "inter-node"

    def covers(self, ranks: tuple[int, ...]) -> bool:
        return self.scope == "all" or len({r // self.node_size for r in ranks}) > 1

    def delay_s(self, kind: str, nbytes: int, ranks: tuple[int, ...]) -> float:
        """Seconds this collective takes on the link (0 for a group it does not cover)."""
        if len(ranks) < 2 or not self.covers(ranks):
            return 0.0
        wire = nbytes * wire_factor(kind, len(ranks))
        return self.latency_ms / 1e3 + (wire * 8 / (self.gbps * 1e9) if self.gbps > 0 else 0.0)


@dataclass(frozen=True)
class Entry:
    seq: int
    """This rank's count of calls on the group so far, this one included."""
    kind: str
    group: str
    nbytes: int
    site: str
    ranks: tuple[int, ...] = ()
    issued: float = 0.0
    """time.monotonic() at the call: an emulated link counts its delay from here."""

    def describe(self) -> str:
        return f"{self.kind} #{self.seq} on {self.group} ({self.nbytes:,} bytes, {self.site})"


# The group is kept beside its ranks so that its id cannot be reused by a later group while cached.
_RANKS: dict[int, tuple[object, tuple[int, ...]]] = {}


def group_ranks(group: dist.ProcessGroup | None) -> tuple[int, ...]:
    """The group's global ranks in group order, looked up once per group (every counted call needs them)."""
    g = group if group is not None else dist.group.WORLD
    cached = _RANKS.get(id(g))
    if cached is None or cached[0] is not g:
        cached = _RANKS[id(g)] = (g, tuple(dist.get_process_group_ranks(g)))
    return cached[1]


def _call_site() -> str:
    """file:line of the code that asked for the collective: the first frame outside the comm modules."""
    frame = sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.endswith(("comm.py", "accounting.py")):
        frame = frame.f_back
    return f"{'/'.join(frame.f_code.co_filename.split('/')[-2:])}:{frame.f_lineno}"


def group_name(group: dist.ProcessGroup | None) -> str:
    """A readable name: the mesh axis (DeviceMesh names its groups) and the global ranks."""
    if group is None:
        group = dist.group.WORLD
    if group is None:
        return "none"
    desc = getattr(group, "group_desc", "") or "group"
    desc = "world" if desc == "default_pg" else desc.removeprefix("mesh_")
    ranks = dist.get_process_group_ranks(group)
    return f"{desc}{ranks}"


@dataclass
class CollectiveLog:
    """This rank's recent collectives and what it is blocked on; read by the watchdog's thread."""

    recent: deque[Entry] = field(default_factory=lambda: deque(maxlen=RECENT))
    counts: dict[str, int] = field(default_factory=dict)
    """Calls issued per group."""
    waiting: tuple[Entry, float] | None = None
    """The collective the main thread is blocked in, and since when (time.monotonic)."""
    activity: str = "starting"
    """What the rank does outside collectives (a step, a checkpoint save), for the report."""
    step: int = 0
    link: SlowLink | None = None
    """An emulated slow link: a covered collective completes no sooner than its delay after issue."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def issue(self, kind: str, group: dist.ProcessGroup | None, nbytes: int) -> Entry:
        name = group_name(group)
        site = _call_site()
        ranks = group_ranks(group) if self.link is not None else ()
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1
            entry = Entry(self.counts[name], kind, name, nbytes, site, ranks, time.monotonic())
            self.recent.append(entry)
        return entry

    @contextlib.contextmanager
    def blocked(self, entry: Entry) -> Iterator[None]:
        self.waiting = (entry, time.monotonic())
        try:
            yield
            if self.link is not None:  # the emulated link: done no sooner than delay after issue
                left = entry.issued + self.link.delay_s(entry.kind, entry.nbytes, entry.ranks) - time.monotonic()
                if left > 0:
                    time.sleep(left)
        finally:
            self.waiting = None

    @contextlib.contextmanager
    def doing(self, activity: str) -> Iterator[None]:
        previous, self.activity = self.activity, activity
        try:
            yield
        finally:
            self.activity = previous

    def snapshot(self) -> dict[str, object]:
        """What this rank publishes: JSON-ready."""
        with self._lock:
            waiting = self.waiting
            return {
                "step": self.step,
                "activity": self.activity,
                "counts": dict(self.counts),
                "recent": [e.describe() for e in list(self.recent)[-5:]],
                "waiting": None
                if waiting is None
                else {
                    "entry": waiting[0].describe(),
                    "group": waiting[0].group,
                    "seq": waiting[0].seq,
                    "for_s": round(time.monotonic() - waiting[1], 1),
                },
            }


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by distinct storages (views and tied weights counted once); None entries hold nothing."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
