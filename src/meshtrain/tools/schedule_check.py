"""Static checks of pipeline schedules: complete, ordered, and free of deadlock under the execution
contract of meshtrain.pipeline.schedules.

`validate_schedule` is what config validation runs on a custom CSV schedule before any process
starts, and what the tests run over every built-in schedule; `check_deadlock` simulates the contract
with blocking batches.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Sequence

from meshtrain.pipeline.schedules import (
    RECV_OF,
    Action,
    Key,
    Kind,
    Layout,
    Schedule,
    ScheduleError,
    dataflow_times,
    drain,
    group_steps,
    messages,
    needs,
    provides,
)

Position = dict[Key | Action, tuple[int, int]]  # compute key or comm action -> (rank, index)


def _pair_messages(schedule: Schedule) -> dict[tuple[int, int], tuple[int, int]]:
    """Match sends to receives per ordered rank pair, FIFO; (rank, index) -> (peer, peer index)."""
    sends: dict[tuple[int, int], list[int]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[int]] = defaultdict(list)
    for rank, actions in enumerate(schedule):
        for idx, a in enumerate(actions):
            if a.kind.is_comm:
                if a.peer is None or not 0 <= a.peer < len(schedule) or a.peer == rank:
                    raise ScheduleError(f"rank {rank} has {a} with an invalid peer")
                (sends[(rank, a.peer)] if a.kind in RECV_OF else recvs[(a.peer, rank)]).append(idx)
    pairs: dict[tuple[int, int], tuple[int, int]] = {}
    for src, dst in sorted(sends.keys() | recvs.keys()):
        out, inc = sends[(src, dst)], recvs[(src, dst)]
        for s_idx, r_idx in zip(out, inc):
            a, b = schedule[src][s_idx], schedule[dst][r_idx]
            if (RECV_OF[a.kind], a.stage, a.microbatch) != (b.kind, b.stage, b.microbatch):
                raise ScheduleError(
                    f"rank {src} sends {a} but the matching receive on rank {dst} is {b} "
                    "(messages between two ranks pair up in order)"
                )
            pairs[(src, s_idx)], pairs[(dst, r_idx)] = (dst, r_idx), (src, s_idx)
        if len(out) != len(inc):
            raise ScheduleError(f"rank {src} sends {len(out)} messages to rank {dst}, which posts {len(inc)} receives")
    return pairs


def check_deadlock(schedule: Schedule) -> None:
    """Run the execution contract with blocking batches; raise ScheduleError if any rank hangs."""
    pairs = _pair_messages(schedule)
    steps = [group_steps(actions) for actions in schedule]
    step_of = {(r, idx): n for r, rank_steps in enumerate(steps) for n, step in enumerate(rank_steps) for idx in step}
    at = [0] * len(schedule)

    def advance(rank: int) -> bool:
        if at[rank] == len(steps[rank]):
            return False
        # A partner op is posted once its rank has reached the step holding it (or passed it).
        partners = [pairs[(rank, idx)] for idx in steps[rank][at[rank]] if (rank, idx) in pairs]
        if any(at[q] < step_of[(q, qi)] for q, qi in partners):
            return False
        at[rank] += 1
        return True

    drain(len(schedule), advance)
    stuck = [r for r in range(len(schedule)) if at[r] < len(steps[r])]
    if stuck:
        where = "; ".join(f"rank {r} at [{', '.join(str(schedule[r][i]) for i in steps[r][at[r]])}]" for r in stuck[:3])
        raise ScheduleError(f"deadlock under the execution contract: {where}")


def validate_schedule(
    schedule: Schedule, pp: int, chunks: int, microbatches: int, placement: Layout | Callable[[int], int] | None = None
) -> None:
    """Raise ScheduleError (one line) unless the schedule is complete, ordered and deadlock-free."""
    layout = (
        placement
        if isinstance(placement, Layout)
        else Layout(pp, tuple(map(placement or (lambda s: s % pp), range(pp * chunks))))
    )
    if len(schedule) != pp or layout.pp != pp or layout.num_stages != pp * chunks:
        raise ScheduleError(
            f"expected {pp} ranks and {pp * chunks} stages, got {len(schedule)} ranks "
            f"and a placement for {layout.num_stages} stages"
        )
    position = _check_actions(schedule, layout, microbatches)
    _check_local_order(schedule, layout, position)
    _check_messages(schedule, layout, position)
    dataflow_times(schedule, layout, lambda a: 1.0)
    check_deadlock(schedule)


def _check_actions(schedule: Schedule, layout: Layout, microbatches: int) -> Position:
    """Range-check every action and require all compute of every (stage, microbatch) exactly once."""
    position: Position = {}
    for rank, actions in enumerate(schedule):
        for idx, a in enumerate(actions):
            if not (0 <= a.stage < layout.num_stages and 0 <= a.microbatch < microbatches):
                raise ScheduleError(
                    f"rank {rank} action {idx} {a} is out of range "
                    f"({layout.num_stages} stages, {microbatches} microbatches)"
                )
            if not a.kind.is_comm and layout.rank_of(a.stage) != rank:
                home = layout.rank_of(a.stage)
                raise ScheduleError(f"{a} is on rank {rank}, but stage {a.stage} lives on rank {home}")
            keys: Sequence[Key | Action] = provides(a) or [a]
            for key in keys:
                if key in position:
                    raise ScheduleError(f"{a} on rank {rank} repeats work already done at rank/index {position[key]}")
                position[key] = (rank, idx)
    names = {Kind.F: "forward (F)", Kind.B: "backward (B or BW)", Kind.W: "weight gradient (W or BW)"}
    for s, i, (kind, name) in itertools.product(range(layout.num_stages), range(microbatches), names.items()):
        if (kind, s, i) not in position:
            raise ScheduleError(f"stage {s} microbatch {i} has no {name}")
    return position


def _check_local_order(schedule: Schedule, layout: Layout, position: Position) -> None:
    """Dependencies held by the same rank must come earlier in that rank's list."""
    for rank, actions in enumerate(schedule):
        for idx, a in enumerate(actions):
            for dep_rank, dep_idx in (position[dep] for dep in needs(a, layout.num_stages, layout.slices)):
                if dep_rank == rank and dep_idx > idx:
                    raise ScheduleError(f"on rank {rank}, {a} comes before {actions[dep_idx]}, which it depends on")


def _check_messages(schedule: Schedule, layout: Layout, position: Position) -> None:
    """Exactly the needed messages exist, each sent after its producer and received before its consumer."""
    needed = 0
    for rank, actions in enumerate(schedule):
        for a in actions:
            for dest, send, recv in messages(a, layout):
                needed += 2
                step = 1 if a.kind == Kind.F else -1
                consumer = Action(Kind.F if step == 1 else Kind.B, a.stage + step, a.microbatch)
                for want, where, side, ref in ((send, rank, "after", a), (recv, dest, "before", consumer)):
                    at, (_, ref_idx) = position.get(want), position[provides(ref)[0]]
                    if at is None or at[0] != where or (at[1] > ref_idx) != (side == "after"):
                        raise ScheduleError(f"{want} must be on rank {where} {side} {ref} (add_comms() builds them)")
    found = sum(a.kind.is_comm for actions in schedule for a in actions)
    if found != needed:
        raise ScheduleError(
            f"schedule has {found} comm actions but its placement needs {needed}; "
            "stages on the same rank hand tensors over without send/recv"
        )
