"""Pipeline schedules as plain data, and the checks that make them safe to execute.

A schedule is ``list[list[Action]]``: entry ``r`` is everything pipeline rank ``r`` does, in order.
Compute actions name a *virtual* stage ``s`` in ``0 .. pp*chunks-1``; a `Layout` says which rank
holds each stage. Stage ``s`` feeds ``s + 1`` in the forward pass and gradients flow back.
Kinds: ``F`` forward; ``B`` gradient w.r.t. the stage input only; ``W`` gradient w.r.t. the stage
weights (after the B of the same stage and microbatch); ``BW`` both at once; four comm kinds.

A comm action's ``stage`` is the stage whose compute *produced* the tensor, on both ends of the wire:

* ``SEND_F(s, i, peer)`` follows ``F(s, i)`` and ships its output to ``peer`` (the rank of ``s+1``),
  where ``RECV_F(s, i, peer)`` receives it as the input of ``F(s+1, i)``.
* ``SEND_B(s, i, peer)`` follows ``B``/``BW(s, i)`` and ships the input gradient to the rank of
  ``s-1``, where ``RECV_B(s, i, peer)`` receives it for ``B``/``BW(s-1, i)``.
* Stages on the same rank hand tensors over locally: no message.

Token slices (TeraPipe): when the `Layout` says each sequence is cut into ``slices`` slices, an
action's microbatch index is a unit ``i*slices + j``: slice j of microbatch i, sent and received like
any microbatch. `needs` then also orders the slices of one sequence on each stage (forward j after
j-1, backward j-1 after j), so the checker, the simulator and `add_comms` see the keys and values
that a stage keeps from one slice for the next.

Execution contract (what an executor must do, and what meshtrain.tools.schedule_check simulates):

1. Each rank executes its list in order, one action at a time.
2. A maximal run of consecutive comm actions is one *batch*: all its ops are posted together, in
   list order, in one ``torch.distributed.batch_isend_irecv`` call, and the rank then waits for
   every op of the batch, sends included, before its next action (`group_steps` does the grouping).
3. Messages between an ordered pair of ranks match first-in-first-out: the k-th SEND from rank a
   to rank b pairs with the k-th RECV on rank b from rank a; both name the same direction (F or B),
   stage and microbatch.
4. A compute action never waits for a peer: its remote input arrived in an earlier batch.

Treating every send as a rendezvous is the most pessimistic reading (NCCL may block a send until the
receiver posts). An executor that waits less, e.g. on sends only lazily, can only make more
progress, so a schedule that passes `check_deadlock` cannot deadlock under it either.

This module holds what running a schedule needs: the data model, the dependency rules, the
built-in generators, the send/recv placement and CSV input and output. Checking a schedule lives in
meshtrain.tools.schedule_check, simulating it in meshtrain.tools.simulator.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class Kind(str, Enum):
    F = "F"
    B = "B"
    W = "W"
    BW = "BW"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    def __str__(self) -> str:
        return self.value

    @property
    def is_comm(self) -> bool:
        return self in _COMM  # a set lookup: Enum.value is slow, and this runs per action per pass


RECV_OF = {Kind.SEND_F: Kind.RECV_F, Kind.SEND_B: Kind.RECV_B}
_COMM = frozenset(RECV_OF) | frozenset(RECV_OF.values())


class ScheduleError(ValueError):
    """A schedule that is malformed or would hang; the message is one line."""


@dataclass(frozen=True)
class Action:
    kind: Kind
    stage: int
    microbatch: int
    peer: int | None = None

    def __post_init__(self) -> None:
        # Lets CSV rows and hand-written tests pass plain strings for the kind.
        object.__setattr__(self, "kind", Kind(self.kind))

    def __str__(self) -> str:
        peer = "" if self.peer is None else f", peer={self.peer}"
        return f"{self.kind}(stage={self.stage}, mb={self.microbatch}{peer})"


Schedule = list[list[Action]]
TraceRecord = tuple[str, int, int, float, float]
"""A compute action as a run timed it: (kind, stage, microbatch, start, end) in seconds."""
Key = tuple[Kind, int, int]  # (F|B|W, stage, microbatch): a piece of compute that has finished


@dataclass(frozen=True)
class Layout:
    """Which rank holds each virtual stage: ``ranks[s]`` is the rank of stage ``s``; and how many
    token slices each sequence is cut into (TeraPipe; 1 for microbatch schedules)."""

    pp: int
    ranks: tuple[int, ...]
    slices: int = 1
    """Token slices per microbatch. Above 1 an action's microbatch index is a *unit* ``u = i*slices + j``
    (slice j of microbatch i), and `needs` adds the slices' order on each stage."""

    def __post_init__(self) -> None:
        if self.pp < 1 or self.slices < 1:
            raise ValueError(f"pp and slices must be at least 1 (got {self.pp}, {self.slices})")
        held = [self.ranks.count(r) for r in range(self.pp)]
        if len(self.ranks) == 0 or len(set(held)) != 1 or sum(held) != len(self.ranks):
            raise ValueError(f"every rank 0..{self.pp - 1} must hold the same number of stages (got {held})")

    @classmethod
    def looped(cls, pp: int, chunks: int = 1, slices: int = 1) -> Layout:
        """Megatron's interleaved placement: stage s on rank s % pp."""
        return cls(pp, tuple(s % pp for s in range(pp * chunks)), slices)

    @classmethod
    def v(cls, pp: int) -> Layout:
        """ZB-V's placement: stages 0..pp-1 down the ranks, pp..2pp-1 back up, so rank r holds r and
        2pp-1-r. Rank 0 holds the first and the last stage; rank pp-1 hands stage pp-1 to pp locally."""
        return cls(pp, tuple(s if s < pp else 2 * pp - 1 - s for s in range(2 * pp)))

    @classmethod
    def infer(cls, schedule: Schedule) -> Layout:
        """Read the placement off the compute actions of a (custom) schedule."""
        owner: dict[int, int] = {}
        for rank, actions in enumerate(schedule):
            for a in actions:
                if not a.kind.is_comm and owner.setdefault(a.stage, rank) != rank:
                    raise ScheduleError(f"stage {a.stage} has compute on ranks {owner[a.stage]} and {rank}")
        missing = sorted(set(range(max(owner, default=-1) + 1)) - owner.keys())
        if not owner or missing:
            raise ScheduleError(f"cannot infer the stage placement: no compute for stages {missing or [0]}")
        return cls(len(schedule), tuple(owner[s] for s in range(len(owner))))

    @property
    def num_stages(self) -> int:
        return len(self.ranks)

    @property
    def chunks(self) -> int:
        return len(self.ranks) // self.pp

    def rank_of(self, stage: int) -> int:
        return self.ranks[stage]


def layout_of(schedule_name: str, pp: int, chunks: int = 1) -> Layout:
    """The placement a built-in schedule assumes: looped, but V-shaped for the V schedules."""
    if schedule_name not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule_name!r}; choices: {', '.join(SCHEDULES)}")
    return Layout.v(pp) if schedule_name in V_SHAPED else Layout.looped(pp, chunks)


def stage_to_rank(schedule_name: str, pp: int, chunks: int = 1) -> Callable[[int], int]:
    """The placement a built-in schedule assumes, as a stage -> rank function."""
    return layout_of(schedule_name, pp, chunks).rank_of


def needs(a: Action, num_stages: int, slices: int = 1) -> list[Key]:
    """The compute that must have finished before ``a`` may start.

    With token slices (``a.microbatch`` a unit, see `Layout.slices`) a stage's forward of slice j
    attends to the keys and values its forward of slice j-1 made, and its backward of slice j-1
    takes the gradient of those keys and values from the backward of slice j."""
    s, i = a.stage, a.microbatch
    later = i + 1 if (i + 1) % slices else None  # the next slice of the same sequence
    if a.kind == Kind.F:
        return ([(Kind.F, s - 1, i)] if s > 0 else []) + ([(Kind.F, s, i - 1)] if i % slices else [])
    if a.kind in (Kind.B, Kind.BW):
        deps = [(Kind.F, s, i)] + ([(Kind.B, s + 1, i)] if s + 1 < num_stages else [])
        return deps + ([(Kind.B, s, later)] if later is not None else [])
    if a.kind == Kind.W:
        return [(Kind.B, s, i)]
    return []


def provides(a: Action) -> list[Key]:
    if a.kind == Kind.BW:
        return [(Kind.B, a.stage, a.microbatch), (Kind.W, a.stage, a.microbatch)]
    return [] if a.kind.is_comm else [(a.kind, a.stage, a.microbatch)]


def messages(a: Action, layout: Layout) -> list[tuple[int, Action, Action]]:
    """(destination rank, SEND, RECV) for the tensor compute ``a`` hands to another rank, if any."""
    s, i, here = a.stage, a.microbatch, layout.rank_of(a.stage)
    if a.kind == Kind.F and s + 1 < layout.num_stages and layout.rank_of(s + 1) != here:
        dest = layout.rank_of(s + 1)
        return [(dest, Action(Kind.SEND_F, s, i, dest), Action(Kind.RECV_F, s, i, here))]
    if a.kind in (Kind.B, Kind.BW) and s > 0 and layout.rank_of(s - 1) != here:
        dest = layout.rank_of(s - 1)
        return [(dest, Action(Kind.SEND_B, s, i, dest), Action(Kind.RECV_B, s, i, here))]
    return []


def group_steps(actions: list[Action]) -> list[list[int]]:
    """Indices of one rank's actions grouped as the contract runs them: a compute, or a comm batch."""
    steps: list[list[int]] = []
    for idx, a in enumerate(actions):
        if a.kind.is_comm and steps and actions[steps[-1][-1]].kind.is_comm:
            steps[-1].append(idx)
        else:
            steps.append([idx])
    return steps


def drain(ranks: int, advance: Callable[[int], bool]) -> None:
    """Let every rank advance as far as it can, round after round, until none can move."""
    moved = True
    while moved:
        moved = False
        for rank in range(ranks):
            while advance(rank):
                moved = True


def dataflow_times(
    schedule: Schedule,
    layout: Layout,
    duration: Callable[[Action], float],
    latency: float = 0.0,
    given: Iterable[Key] = (),
) -> list[list[tuple[float, float]]]:
    """(start, end) of every action when each starts as soon as its rank and its inputs allow.

    Comm actions are zero-length markers here; a remote input simply arrives ``latency`` after it
    was produced. ``given`` is compute finished before this list starts (an earlier 2BW step's), its
    results already where they are needed. Raises ScheduleError when the orders wait in a cycle.
    """
    done: dict[Key, tuple[float, int]] = {key: (-latency, -1) for key in given}
    times: list[list[tuple[float, float]]] = [[] for _ in schedule]

    def advance(rank: int) -> bool:
        if len(times[rank]) == len(schedule[rank]):
            return False
        a = schedule[rank][len(times[rank])]
        deps = needs(a, layout.num_stages, layout.slices)
        if any(d not in done for d in deps):
            return False
        ready = [done[d][0] + (latency if done[d][1] != rank else 0.0) for d in deps]
        start = max([times[rank][-1][1] if times[rank] else 0.0, *ready])
        times[rank].append((start, start + (0.0 if a.kind.is_comm else duration(a))))
        done.update({key: (times[rank][-1][1], rank) for key in provides(a)})
        return True

    drain(len(schedule), advance)
    stuck = [(r, acts[len(times[r])]) for r, acts in enumerate(schedule) if len(times[r]) < len(acts)]
    if stuck:
        waits = "; ".join(
            f"rank {r} waits at {a} for "
            + ", ".join(str(Action(*key)) for key in needs(a, layout.num_stages, layout.slices) if key not in done)
            for r, a in stuck[:3]
        )
        raise ScheduleError(f"dependency deadlock (orders wait on each other): {waits}")
    return times


def inherited(schedule: Schedule, layout: Layout) -> set[Key]:
    """The compute the lists depend on but do not run: what earlier steps left done (2BW's windows)."""
    provided = {key for actions in schedule for a in actions for key in provides(a)}
    return {d for actions in schedule for a in actions for d in needs(a, layout.num_stages, layout.slices)} - provided


def add_comms(schedule: Schedule, layout: Layout, given: Iterable[Key] = ()) -> Schedule:
    """Insert SEND/RECV actions into a compute-only schedule so the contract cannot deadlock.

    Every message gets one global key: the time its producer finishes in a unit-cost run, then the
    sender's rank. Both ends post it at that point of their own order, so each rank meets its
    messages in increasing key order and equal keys share a batch. A rank stuck in a batch then
    waits for a rank stuck in an *earlier* batch of its own, whose keys are all smaller: the
    largest key of the stuck batches falls along any chain of waits, so the chain cannot close.
    The argument does not need a message's consumer in the list: 2BW's windows receive some
    gradients in the sender's step and use them in the next (``given`` is `dataflow_times`').
    """
    if any(a.kind.is_comm for actions in schedule for a in actions):
        raise ScheduleError("add_comms expects a compute-only schedule; it already has comm actions")
    times = dataflow_times(schedule, layout, lambda a: 1.0, given=given)
    pending: list[list[tuple[tuple[float, int], Action]]] = [[] for _ in schedule]
    for rank, actions in enumerate(schedule):
        for a, (_, end) in zip(actions, times[rank]):
            for dest, send, recv in messages(a, layout):
                pending[rank].append(((end, rank), send))
                pending[dest].append(((end, rank), recv))
    result: Schedule = []
    for rank, actions in enumerate(schedule):
        queue = sorted(pending[rank], key=lambda item: item[0])
        merged: list[Action] = []
        taken = 0
        for a, (start, _) in zip(actions, times[rank]):
            # A message keyed at time t goes before the first compute that starts at or after t.
            while taken < len(queue) and queue[taken][0][0] <= start:
                merged.append(queue[taken][1])
                taken += 1
            merged.append(a)
        merged.extend(item[1] for item in queue[taken:])
        result.append(merged)
    return result


def _check_sizes(name: str, pp: int, microbatches: int, chunks: int, max_chunks: int | None = 1) -> None:
    if pp < 1 or microbatches < 1 or chunks < 1:
        raise ValueError(f"{name} needs pp, microbatches and chunks >= 1 (got {pp}, {microbatches}, {chunks})")
    if max_chunks is not None and chunks > max_chunks:
        raise ValueError(f"{name} runs one stage per rank; use chunks=1 (got {chunks}) or interleaved-1f1b")


def _rank_order(stage: int, microbatches: int, warmup: int, w_lag: int | None) -> list[Action]:
    """One rank of the 1F1B family: ``warmup`` forwards, then one F per backward while any remain.

    ``w_lag`` None fuses B and W; else a W runs once more than ``w_lag`` wait, the rest fill the tail."""
    order = [Action(Kind.F, stage, i) for i in range(warmup)]
    next_f, next_w = warmup, 0
    for b in range(microbatches):
        if next_f < microbatches:
            order.append(Action(Kind.F, stage, next_f))
            next_f += 1
        if w_lag is None:
            order.append(Action(Kind.BW, stage, b))
            continue
        order.append(Action(Kind.B, stage, b))
        if b + 1 - next_w > w_lag:
            order.append(Action(Kind.W, stage, next_w))
            next_w += 1
    if w_lag is not None:
        order.extend(Action(Kind.W, stage, i) for i in range(next_w, microbatches))
    return order


def _family(
    name: str, pp: int, microbatches: int, chunks: int, warmup: Callable[[int], int], w_lag: Callable[[int], int] | None
) -> Schedule:
    _check_sizes(name, pp, microbatches, chunks)
    compute = [
        _rank_order(r, microbatches, min(warmup(r), microbatches), None if w_lag is None else w_lag(r))
        for r in range(pp)
    ]
    return add_comms(compute, Layout.looped(pp))


def gpipe(pp: int, microbatches: int, chunks: int = 1) -> Schedule:
    """All forwards, then all fused backwards: peak memory grows with the microbatch count."""
    return _family("gpipe", pp, microbatches, chunks, lambda r: microbatches, None)


def one_f_one_b(pp: int, microbatches: int, chunks: int = 1) -> Schedule:
    """PipeDream-flush 1F1B: pp-rank-1 warmup forwards bound each rank to pp-rank microbatches in flight."""
    return _family("1f1b", pp, microbatches, chunks, lambda r: pp - r - 1, None)


def zb_h1(pp: int, microbatches: int, chunks: int = 1) -> Schedule:
    """ZB-H1: 1F1B warmup, B/W split, rank r holding back r W's for the cooldown bubble.

    At most pp - r microbatches wait for B and r for W: pp in all on every rank, as 1F1B's rank 0."""
    return _family("zb-h1", pp, microbatches, chunks, lambda r: pp - r - 1, lambda r: r)


def zb_h2(pp: int, microbatches: int, chunks: int = 1) -> Schedule:
    """ZB-H2: twice the warmup (peak 2pp-1 on rank 0) fills the wait for the first B; W lag 2r."""
    return _family("zb-h2", pp, microbatches, chunks, lambda r: 2 * (pp - r - 1), lambda r: 2 * r)


def forward_only(layout: Layout, microbatches: int) -> Schedule:
    """Evaluation's schedule: GPipe's forward half on any layout. Each rank runs its stages in order,
    each over every microbatch (F only), so microbatch i+1 enters stage s while stage s+1 takes i;
    `add_comms` places the sends and receives. With no backward nothing waits in flight."""
    if microbatches < 1:
        raise ValueError(f"forward_only needs microbatches >= 1 (got {microbatches})")
    compute = [
        [
            Action(Kind.F, s, i)
            for s in range(layout.num_stages)
            if layout.rank_of(s) == rank
            for i in range(microbatches)
        ]
        for rank in range(layout.pp)
    ]
    return add_comms(compute, layout)


def interleaved_1f1b(pp: int, microbatches: int, chunks: int = 1) -> Schedule:
    """Megatron's interleaved 1F1B: each rank runs ``chunks`` looped stages, in groups of pp microbatches."""
    _check_sizes("interleaved-1f1b", pp, microbatches, chunks, max_chunks=None)
    if microbatches % pp:
        raise ValueError(
            f"interleaved-1f1b needs microbatches to be a multiple of pp (got microbatches={microbatches}, pp={pp})"
        )
    if chunks == 1:
        return one_f_one_b(pp, microbatches)
    total = microbatches * chunks

    def virtual(k: int, rank: int, kind: Kind) -> Action:
        chunk = (k // pp) % chunks
        chunk = chunks - 1 - chunk if kind == Kind.BW else chunk
        return Action(kind, chunk * pp + rank, (k // (pp * chunks)) * pp + k % pp)

    compute = []
    for r in range(pp):
        # Megatron's warmup: (chunks-1)*pp forwards reach microbatch 0's last chunk, whose backward
        # comes first; 2(pp-r-1) more cover its trip to the last rank and back.
        warmup = total if microbatches == pp else min(2 * (pp - r - 1) + (chunks - 1) * pp, total)
        order = [virtual(k, r, Kind.F) for k in range(warmup)]
        for k in range(total):
            if warmup + k < total:
                order.append(virtual(warmup + k, r, Kind.F))
            order.append(virtual(k, r, Kind.BW))
        compute.append(order)
    return add_comms(compute, Layout.looped(pp, chunks))


def zb_v(pp: int, microbatches: int, chunks: int = 2) -> Schedule:
    """ZB-V (Qi et al. 2023, section 6): two chunks per rank on `Layout.v`, B and W split.

    Rank r holds stage a = r (going down) and b = 2pp-1-r (coming back). In unit time (a chunk's F, B
    and W cost 1 each) it starts at tick r, b's first input arrives at tick 2pp-1-r and b's first
    gradient at 2pp+r, so its order is, in phases:

    1. 2(pp-r)-1 forwards of a, filling the wait for b's first input;
    2. r pairs F(b) F(a), while b's inputs arrive every other tick;
    3. pp-r triples F(b) B(b) W(b), as b's first gradients come back;
    4. the steady state: F(a) B(a) W(a) F(b) B(b) W(b) until every forward has run;
    5. the drain: r pairs B(a) B(b), then pp-r pairs B(a) W(a), the W's still owed last, which fill
       the time the last gradients take to come back.

    At most 2pp chunk-forwards await their B on a rank (pp full-stage microbatches, 1F1B's rank-0
    peak, on every rank), and with equal costs every rank is busy from its first action to its last.
    The phases need 2pp-1 microbatches (rank 0's warmup); with fewer, the order is built for 2pp-1
    and the missing ones dropped, which leaves idle where they were.
    """
    _check_sizes("zb-v", pp, microbatches, chunks, max_chunks=None)
    if chunks != 2:
        raise ValueError(f"zb-v runs exactly two chunks per rank (a V); use chunks=2 (got {chunks})")
    n = max(microbatches, 2 * pp - 1)
    orders = [[a for a in _zb_v_rank(r, 2 * pp - 1 - r, pp, n) if a.microbatch < microbatches] for r in range(pp)]
    return add_comms(orders, Layout.v(pp))


def _zb_v_rank(a: int, b: int, pp: int, n: int) -> list[Action]:
    """One rank's ZB-V order over n microbatches (see `zb_v`); a and b are its two stages."""
    order: list[Action] = []
    count = {(kind, s): 0 for kind in (Kind.F, Kind.B, Kind.W) for s in (a, b)}

    def run(*steps: tuple[Kind, int]) -> None:
        for kind, s in steps:
            order.append(Action(kind, s, count[(kind, s)]))
            count[(kind, s)] += 1

    rank = a
    for _ in range(2 * (pp - rank) - 1):
        run((Kind.F, a))
    for _ in range(rank):
        run((Kind.F, b), (Kind.F, a))
    for _ in range(pp - rank):
        run((Kind.F, b), (Kind.B, b), (Kind.W, b))
    while count[(Kind.F, b)] < n:
        run(*([(Kind.F, a)] if count[(Kind.F, a)] < n else []), (Kind.B, a), (Kind.W, a))
        run((Kind.F, b), (Kind.B, b), (Kind.W, b))
    for _ in range(rank):
        run((Kind.B, a), (Kind.B, b))
    for _ in range(pp - rank):
        run((Kind.B, a), (Kind.W, a))
    for s in (b, a):
        while count[(Kind.W, s)] < n:
            run((Kind.W, s))
    return order


def terapipe(pp: int, microbatches: int, chunks: int = 1, slices: int = 1) -> Schedule:
    """TeraPipe (Li et al., 2021): each sequence cut into ``slices`` token slices that flow through
    the stages like microbatches, GPipe-style: every rank runs all forwards in order (sequence by
    sequence, slice by slice), then every fused backward in reverse, last slice first, since each
    slice's backward hands the gradient of the keys and values it attended to back to earlier
    slices. Actions name units ``i*slices + j``; the layout must carry the same ``slices``."""
    _check_sizes("terapipe", pp, microbatches, chunks)
    if slices < 1:
        raise ValueError(f"terapipe needs slices >= 1 (got {slices})")
    units = microbatches * slices
    compute = [
        [Action(Kind.F, r, u) for u in range(units)] + [Action(Kind.BW, r, u) for u in reversed(range(units))]
        for r in range(pp)
    ]
    return add_comms(compute, Layout.looped(pp, 1, slices))


TWO_BW = "2bw"
"""PipeDream-2BW: no flush, so not one self-contained list per step like SCHEDULES' (see `two_bw_window`)."""


def two_bw_window(pp: int, microbatches: int, first: bool, last: bool) -> Schedule:
    """One optimizer step of PipeDream-2BW: the window of a flush-free 1F1B over the microbatch stream.

    Microbatch ids 0..m-1 are the previous step's batch, m..2m-1 this step's. Rank r keeps 1F1B's
    warmup w = pp-1-r across steps: its window is this batch's m forwards, each followed by the
    backward of the microbatch w earlier in the stream, so the last w backwards of the previous batch
    run here. The first step has no previous batch (a warmup prefix); the last drains this batch's
    last w backwards so nothing stays in flight. A gradient sent to rank r-1 for a backward it runs
    in the next step is received in this one (the sender's), so no message crosses a step boundary.
    """
    _check_sizes(TWO_BW, pp, microbatches, 1)
    m = microbatches
    if m < pp:
        raise ValueError(f"2bw needs at least pp microbatches per batch (got microbatches={m}, pp={pp})")
    compute: Schedule = []
    for r in range(pp):
        w = pp - 1 - r
        order: list[Action] = []
        for i in range(m):
            order.append(Action(Kind.F, r, m + i))
            if not (first and i < w):
                order.append(Action(Kind.BW, r, m + i - w))
        if last:
            order.extend(Action(Kind.BW, r, p) for p in range(2 * m - w, 2 * m))
        compute.append(order)
    layout = Layout.looped(pp)
    return add_comms(compute, layout, inherited(compute, layout))  # the previous step's forwards and backwards


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_1f1b,
    "zb-h1": zb_h1,
    "zb-h2": zb_h2,
    "zb-v": zb_v,
    "terapipe": terapipe,
}
# Schedules whose units are token slices of a microbatch (parallel.pp_slices of them): their
# generator takes the slice count, and their layout carries it.
SLICED = frozenset({"terapipe"})
# Schedules with W actions: their weight gradients are accumulated outside autograd (split_backward.py),
# so no post-accumulate-grad hook sees them.
SPLIT_BACKWARD = frozenset({"zb-h1", "zb-h2", "zb-v"})
# Schedules on the V placement (`Layout.v`), which fix the chunks per rank at 2.
V_SHAPED = frozenset({"zb-v"})


def native_chunks(name: str, chunks: int | None = None) -> int:
    """The chunks a built-in schedule runs with: 2 for a V schedule, else `chunks` (default 1)."""
    return 2 if name in V_SHAPED else chunks or 1


def is_custom(name: str) -> bool:
    """A schedule named by a CSV file path rather than a built-in name."""
    return name.endswith(".csv")


def build_schedule(name: str, pp: int, microbatches: int, chunks: int = 1, slices: int = 1) -> tuple[Schedule, Layout]:
    """A built-in schedule, or a user's CSV (send/recv actions added when it lists only computes).
    ``slices`` is for the SLICED schedules only; every other one runs whole microbatches."""
    if name in SLICED:
        return SCHEDULES[name](pp, microbatches, chunks, slices), Layout.looped(pp, chunks, slices)
    if slices != 1:
        raise ValueError(f"schedule {name!r} runs whole microbatches; slices={slices} needs one of {', '.join(SLICED)}")
    if not is_custom(name):
        return SCHEDULES[name](pp, microbatches, chunks), layout_of(name, pp, chunks)
    schedule = from_csv(name)
    layout = Layout.infer(schedule)
    if not any(a.kind.is_comm for actions in schedule for a in actions):
        schedule = add_comms(schedule, layout)
    return schedule, layout


def splits_backward(name: str) -> bool:
    """Whether the schedule computes weight gradients in separate W actions."""
    if is_custom(name):
        return any(a.kind == Kind.W for actions in from_csv(name) for a in actions)
    return name in SPLIT_BACKWARD


_COLUMNS = ("rank", "index", "kind", "stage", "microbatch", "peer")


def to_csv(schedule: Schedule, path: str | Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(_COLUMNS)
        writer.writerows(
            [rank, idx, a.kind.value, a.stage, a.microbatch, "" if a.peer is None else a.peer]
            for rank, actions in enumerate(schedule)
            for idx, a in enumerate(actions)
        )


def from_csv(path: str | Path) -> Schedule:
    """Read a schedule written by `to_csv` (or by hand); rows may come in any order."""
    rows: dict[int, dict[int, Action]] = defaultdict(dict)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != _COLUMNS:
            raise ScheduleError(f"{path}: header must be {','.join(_COLUMNS)}")
        for row in reader:
            rank, idx, action = _parse_row(row, f"{path}:{reader.line_num}")
            if idx in rows[rank]:
                raise ScheduleError(f"{path}:{reader.line_num}: rank {rank} index {idx} appears twice")
            rows[rank][idx] = action
    schedule: Schedule = []
    for rank in range(max(rows, default=-1) + 1):
        indices = sorted(rows[rank])
        if indices != list(range(len(indices))):
            raise ScheduleError(f"{path}: indices of rank {rank} must be 0..{len(indices) - 1} without gaps")
        schedule.append([rows[rank][i] for i in indices])
    return schedule


def _parse_row(row: dict[str, str], where: str) -> tuple[int, int, Action]:
    try:
        kind = Kind(row["kind"].strip().upper())
        rank, idx, stage, mb = (int(row[c]) for c in ("rank", "index", "stage", "microbatch"))
        peer = int(row["peer"]) if row["peer"].strip() else None
    except (ValueError, TypeError, AttributeError) as exc:
        raise ScheduleError(f"{where}: cannot parse row ({exc})") from None
    if min(rank, idx, stage, mb) < 0 or (peer is None) == kind.is_comm:
        raise ScheduleError(f"{where}: negative number, or peer given for compute / missing for comm")
    return rank, idx, Action(kind, stage, mb, peer)
