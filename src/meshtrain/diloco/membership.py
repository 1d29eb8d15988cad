"""Elastic islands (diloco.join): each island is its own launch, and the outer group of every sync is
a quorum of the islands that show up, agreed through the store `meshtrain lighthouse` hosts.

Per sync (the one after inner step t), attempt r = 0, 1, ... (a retry after a failed collective):
  1. each island's position-0 rank announces itself (here/t/r/ISLAND) and waits up to timeout_s for
     the islands it expects: the members of the last sync (of the failed attempt, on a retry) and
     the registered joiners (join/ISLAND holds a nonce);
  2. an up-to-date island proposes the members (those that announced) and the joiners among them,
     and the store's compare_set keeps the first proposal (members/t/r): every island reads that one;
  3. the members list goes to the island's other ranks (the island's world group), and the ranks
     at place j of every member island make a gloo group over a PrefixStore named after t, r and j;
  4. if some members join, the first up-to-date member broadcasts the outer state and the step to
     them; then the mean (meshtrain.diloco.comm) runs, a joiner contributing zeros and not counted.
A collective that fails (an island died mid-sync) discards the group and runs attempt r + 1 among
the survivors, with the same pseudo-gradient. An island left out of a sync (it came late) registers
as a joiner and gets the state at the next sync; one that starts while a run is live (a torchrun
restart, a late start) registers, takes part in the first attempt opened after that (the islands
already waiting at one are not held up by it) and returns its step (`start`). A fresh run's islands
wait for one another once before the first step (START_GRACE_S at most). An island slower than the
others by more than timeout_s every round is left out of every sync: give it a larger timeout_s.

Torch makes process groups only among the ranks of one world; the islands are separate worlds, so
a group is made from its backend and registered with torch's bookkeeping by hand (`_make_group`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from meshtrain.accounting import Recorder
from meshtrain.diloco.comm import mean_over_islands, state_from

POLL_S = 0.05
"""How often a waiting island looks at the store: small beside any timeout_s worth setting."""
NOTE_EVERY_S = 30.0
START_GRACE_S = 120.0
"""How long a fresh run's islands wait for one another before the first step."""
T = TypeVar("T")


@dataclass(frozen=True)
class Sync:
    """One attempt at the sync after inner step `step`: who takes part, and who joins at it."""

    step: int
    retry: int
    members: tuple[int, ...]
    joiners: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.step}/{self.retry}"

    @property
    def source(self) -> int:
        """The up-to-date member that sends the outer state to the joiners."""
        return next(i for i in self.members if i not in self.joiners)

    def encode(self) -> str:
        return json.dumps({"step": self.step, "retry": self.retry, "members": self.members, "joiners": self.joiners})

    @staticmethod
    def decode(text: str | bytes) -> Sync:
        d = json.loads(text)
        return Sync(d["step"], d["retry"], tuple(d["members"]), tuple(d["joiners"]))


def propose(step: int, retry: int, present: set[int], previous: set[int], registered: set[int]) -> Sync:
    """The members of a sync: every island present. Joiners: those present that registered as
    joiners or were not members of the last sync (their outer state is not the run's)."""
    members = tuple(sorted(present))
    joiners = tuple(i for i in members if i in registered or i not in previous)
    if len(joiners) == len(members):  # nobody holds the run's state: each carries on with its own
        joiners = ()
    return Sync(step, retry, members, joiners)


def gathered(present: set[int], expected: set[int], waited_s: float, timeout_s: float) -> bool:
    """Whether an island stops waiting: all it expects are there, or the time is up."""
    return expected <= present or waited_s >= timeout_s


def divisor(members: tuple[int, ...], joiners: tuple[int, ...]) -> int:
    """The islands the mean is over: a joiner's pseudo-gradient (zeros) is not one of them."""
    return len(members) - len(joiners)


class ElasticIslands:
    """The OuterGroup of join mode (meshtrain.diloco.outer): one per rank. The island's position-0
    rank speaks to the store; the other ranks follow through the island's world group."""

    def __init__(
        self,
        address: str,
        island: int,
        islands: int,
        position: int,
        timeout_s: float,
        stats: Recorder,
        total_steps: int,
    ) -> None:
        host, _, port = address.rpartition(":")
        self.timeout_s, self.stats, self.total_steps = timeout_s, stats, total_steps
        self.timeout = datetime.timedelta(seconds=timeout_s)
        client = dist.TCPStore(host, int(port), is_master=False, timeout=self.timeout, wait_for_workers=False)
        self.store = dist.PrefixStore("diloco", client)
        self.island, self.islands, self.position = island, islands, position
        self.previous = set(range(islands))
        """The members of the last sync this island took part in (before the first: every island)."""
        self.nonce = ""
        """Set while this island is a registered joiner: its outer state is not the run's."""
        self.state: list[torch.Tensor] = []
        self.joined: tuple[Sync, dist.ProcessGroup | None] | None = None
        """The sync that `start` joined, kept for that sync's mean."""
        self.log = logging.getLogger(f"meshtrain.rank{dist.get_rank() if dist.is_initialized() else 0}")

    # ---- the OuterGroup protocol ---------------------------------------------------------------
    def start(self, step: int, state: list[torch.Tensor]) -> int:
        self.state = state
        live = self._in_island(self._live)
        if live is None:
            self._in_island(self._all_ready)
            return step
        if self.island in live.members and step >= live.step:
            return step  # it resumed the checkpoint of the last sync it took part in: nothing is missing
        skip: str | None = None
        while True:
            sync = self._in_island(partial(self._admission, step, skip))
            group = None
            try:
                group = self._group(sync)
                self._exchange_state(group, sync)
            except RuntimeError as e:  # the members retry the sync without the island that failed; so do we
                self._failed(sync, group, e)
                skip = sync.key  # (the retry is a new attempt: it counts this island in)
                continue
            self.joined = (sync, group)
            self.log.warning(
                f"island {self.island} joins the run at the sync after step {sync.step}: islands "
                f"{list(sync.members)}, outer state from island {sync.source}"
            )
            return sync.step

    def mean(self, delta: torch.Tensor, step: int, stats: Recorder, codec: str, block: int) -> torch.Tensor:
        expected, retry = set(self.previous), 0
        while True:
            joined, self.joined = self.joined, None
            group = joined[1] if joined is not None else None
            if joined is not None and joined[0].step == step:
                sync, ready = joined[0], True
            else:
                discard(group)  # (a group `start` made for another sync: never the case in DiLoCo's order)
                group = None
                sync, ready = self._in_island(partial(self._agree, step, retry, expected)), False
                if self.island not in sync.members:
                    self._left_out(sync)
                    return torch.zeros_like(delta)
            try:
                if not ready:
                    group = self._group(sync)
                    self._exchange_state(group, sync)
                mine = torch.zeros_like(delta) if self.island in sync.joiners else delta
                out = mean_over_islands(mine, group, stats, codec, block, divisor(sync.members, sync.joiners))
            except RuntimeError as e:  # an island died mid-sync: the survivors try again
                self._failed(sync, group, e)
                expected, retry = set(sync.members), sync.retry + 1
                continue
            self._done(sync, group)
            return out

    # ---- the quorum (position 0) ---------------------------------------------------------------
    def _agree(self, step: int, retry: int, expected: set[int]) -> Sync:
        key = f"{step}/{retry}"
        self.store.set(f"here/{key}/{self.island}", "1")
        self.store.set("round", key)  # what a waiting joiner (`start`) looks for
        began = time.monotonic()
        # a joiner does not propose (its view of the last members is stale): an up-to-date island does
        if self.nonce and self._wait_for(f"members/{key}", 2 * self.timeout_s):
            return Sync.decode(self.store.get(f"members/{key}"))
        while True:
            registered = self._registered()
            present = self._present(key)
            if gathered(present, expected | set(registered), time.monotonic() - began, self.timeout_s):
                break
            time.sleep(POLL_S)
        proposal = propose(
            step, retry, present, self.previous, set(registered) | ({self.island} if self.nonce else set())
        )
        sync = Sync.decode(self.store.compare_set(f"members/{key}", "", proposal.encode()))
        self._report(sync, expected, registered)
        return sync

    def _report(self, sync: Sync, expected: set[int], registered: dict[int, str]) -> None:
        gone = sorted((expected | set(registered)) - set(sync.members) - {self.island})  # (itself: _left_out)
        if gone:
            self.log.warning(
                f"island{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))} missed the sync after step "
                f"{sync.step} (timeout {self.timeout_s:g} s): continuing with islands {list(sync.members)}"
            )
        for i in gone:  # a joiner that never came: no later sync waits for it (unless it registers again)
            if i in registered:
                self.store.compare_set(f"join/{i}", registered[i], "")
        for i in sync.joiners:
            if i != self.island:
                self.log.warning(f"island {i} joins at the sync after step {sync.step}: islands {list(sync.members)}")

    def _admission(self, step: int, skip: str | None) -> Sync:
        """A joiner's wait: it announces itself for each attempt at a sync after `step` that opens
        after it registered (the islands already waiting at a sync are not held up by it), until one
        admits it. `skip`: the attempt not to take part in (default: the one open now)."""
        opened = self._round() if skip is None else skip  # read before registering: later ones count it in
        if not self.nonce:
            self._register()
        key, began, noted = "", time.monotonic(), time.monotonic()
        while True:
            if self.store.get(f"join/{self.island}").decode() != self.nonce:
                self.store.set(f"join/{self.island}", self.nonce)  # a sync that gave up on it cleared it
            latest = self._round()
            if latest not in (opened, key) and int(latest.split("/")[0]) > step:
                key = latest
                self.store.set(f"here/{key}/{self.island}", "1")
            if key and self.store.check([f"members/{key}"]):
                sync = Sync.decode(self.store.get(f"members/{key}"))
                if self.island in sync.members:
                    return sync
            live = self._live()
            if live is not None and live.step >= self.total_steps:
                raise RuntimeError(f"island {self.island} cannot rejoin: the run ended at step {live.step} without it")
            if time.monotonic() - noted > NOTE_EVERY_S:
                noted = time.monotonic()
                self.log.warning(f"island {self.island} has waited {noted - began:.0f} s for a sync to join")
            time.sleep(POLL_S)

    def _round(self) -> str:
        """The latest attempt at a sync that an island opened ("STEP/RETRY"), or "" before the first."""
        return self.store.get("round").decode() if self.store.check(["round"]) else ""

    def _all_ready(self) -> None:
        """A fresh run starts when every island is up (or after START_GRACE_S), so that the first sync
        does not drop an island whose start-up merely took longer."""
        self.store.set(f"ready/{self.island}", "1")
        began = time.monotonic()
        while time.monotonic() - began < max(START_GRACE_S, self.timeout_s):
            if self.store.check([f"ready/{i}" for i in range(self.islands)]):
                return
            time.sleep(POLL_S)
        self.log.warning(f"not every island was up after {time.monotonic() - began:.0f} s: starting anyway")

    def _live(self) -> Sync | None:
        """The last sync agreed in this run, if any."""
        return Sync.decode(self.store.get("agreed")) if self.store.check(["agreed"]) else None

    def _register(self) -> None:
        """Become a registered joiner: the next sync expects this island and sends it the outer state."""
        self.nonce = uuid.uuid4().hex
        if self.position == 0:
            self.store.set(f"join/{self.island}", self.nonce)

    def _registered(self) -> dict[int, str]:
        keys = {i: f"join/{i}" for i in range(self.islands)}
        nonces = {i: self.store.get(k).decode() for i, k in keys.items() if self.store.check([k])}
        return {i: n for i, n in nonces.items() if n}

    def _present(self, key: str) -> set[int]:
        return {i for i in range(self.islands) if self.store.check([f"here/{key}/{i}"])}

    def _wait_for(self, key: str, seconds: float) -> bool:
        began = time.monotonic()
        while not self.store.check([key]):
            if time.monotonic() - began > seconds:
                return False
            time.sleep(POLL_S)
        return True

    # ---- every rank ------------------------------------------------------------------------------
    def _in_island(self, work: Callable[[], T]) -> T:
        """`work` done by the island's position-0 rank (the one that speaks to the store); its result
        on every rank of the island (through the island's world group)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return work()
        box = [work() if self.position == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return cast(T, box[0])

    def _group(self, sync: Sync) -> dist.ProcessGroup | None:
        """The gloo group of this place (island-local rank) among the sync's members."""
        if len(sync.members) == 1:
            return None
        name = f"diloco-sync{sync.step}-try{sync.retry}-place{self.position}"
        return make_group(
            dist.PrefixStore(f"group/{sync.key}/{self.position}", self.store),
            sync.members.index(self.island),
            sync.members,
            name,
            self.timeout,
        )

    def _exchange_state(self, group: dist.ProcessGroup | None, sync: Sync) -> None:
        if group is not None and sync.joiners:
            state_from(self.state, group, sync.members.index(sync.source), self.stats)

    def _failed(self, sync: Sync, group: dist.ProcessGroup | None, error: Exception) -> None:
        discard(group)
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        self.log.warning(
            f"the sync after step {sync.step} (attempt {sync.retry + 1}, islands {list(sync.members)}) failed: "
            f"{reason}; trying again with the islands still there"
        )

    def _done(self, sync: Sync, group: dist.ProcessGroup | None) -> None:
        discard(group)
        if self.nonce and self.position == 0:
            self.store.compare_set(f"join/{self.island}", self.nonce, "")
        self.nonce = ""
        self.previous = set(sync.members)
        if self.position == 0:
            self.store.set("agreed", sync.encode())

    def _left_out(self, sync: Sync) -> None:
        self._register()
        self.log.warning(
            f"island {self.island} came too late for the sync after step {sync.step} (islands "
            f"{list(sync.members)} went on): it takes the run's outer state at the next sync"
        )


def make_group(
    store: dist.Store, rank: int, members: tuple[int, ...], name: str, timeout: datetime.timedelta
) -> dist.ProcessGroup:
    """A gloo process group among ranks of different worlds. dist.new_group only groups ranks of the
    default world, so the group is assembled as torch's own helper does and registered with torch's
    bookkeeping (a private function), which the collectives and dist.destroy_process_group look up;
    its "global ranks" are the members' island indices, which is what the collective log shows."""
    size = len(members)
    backend = dist.ProcessGroupGloo(store, rank, size, timeout)
    group = dist.ProcessGroup(store, rank, size)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    group._set_group_name(c10d.GroupName(name))
    group._set_group_desc(name)
    c10d._register_pg_in_world(
        group, "gloo", store, c10d.GroupName(name), "cpu:gloo", {m: i for i, m in enumerate(members)}
    )
    return group


def discard(group: dist.ProcessGroup | None) -> None:
    """Unregister a sync's group; one whose peer died may fail to shut down cleanly, which is moot."""
    if group is not None:
        with contextlib.suppress(RuntimeError, ValueError, KeyError):
            dist.destroy_process_group(group)
