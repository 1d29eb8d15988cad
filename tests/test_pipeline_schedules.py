"""Pure tests of pipeline schedules, the simulator, the plot and the `schedule` CLI (no processes)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from meshtrain.pipeline.schedules import (
    SCHEDULES,
    SPLIT_BACKWARD,
    Action,
    Kind,
    Layout,
    Schedule,
    ScheduleError,
    add_comms,
    from_csv,
    group_steps,
    native_chunks,
    stage_to_rank,
    to_csv,
)
from meshtrain.tools import schedule_cli as cli
from meshtrain.tools.schedule_check import check_deadlock, validate_schedule
from meshtrain.tools.simulator import Costs, closed_form, from_trace, simulate

pytestmark = pytest.mark.pure

UNIFORM, PAPER = Costs(1, 1, 1), Costs(2, 2, 1)
Case = tuple[str, int, int, int]  # schedule name, pp, chunks, microbatches


def _grid() -> list[Case]:
    cases = set()
    for name in SCHEDULES:
        for p in range(1, 6):
            for v in (1, 2) if name == "interleaved-1f1b" else (native_chunks(name),):
                for m in {1, 2, p, 2 * p, 8, 3 * p + 1}:
                    if name != "interleaved-1f1b" or m % p == 0:
                        cases.add((name, p, v, m))
    return sorted(cases)


GRID = _grid()


@pytest.fixture(scope="module")
def built() -> dict[Case, Schedule]:
    return {case: SCHEDULES[case[0]](case[1], case[3], case[2]) for case in GRID}


def _regime(name: str, p: int, m: int, costs: Costs) -> tuple[bool, bool]:
    """Where the tests expect the closed form to hold: (on the makespan, in steady state)."""
    if name == "zb-h1":
        return m >= p, m >= p
    if name == "zb-h2":  # equal costs reach the paper's zero only per rank; see docs/pipeline.md
        return m >= 2 * p and costs == PAPER, m >= 2 * p
    if name == "zb-v":  # the same split as ZB-H2's; tests/test_pipeline_zbv.py checks zb-v alone
        return m >= 2 * p - 1 and costs == PAPER, m >= 2 * p - 1
    return True, True


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c)))
def test_schedule_validates_matches_closed_forms_and_round_trips(
    case: Case, built: dict[Case, Schedule], tmp_path: Path
) -> None:
    name, p, v, m = case
    schedule = built[case]
    validate_schedule(schedule, p, v, m, stage_to_rank(name, p, v))
    for costs in (UNIFORM, PAPER):
        result, pred = simulate(schedule, costs), closed_form(name, p, m, v, costs)
        assert (pred.holds, pred.holds_steady) == _regime(name, p, m, costs)
        assert result.peak == pytest.approx(pred.peak)
        if pred.holds:
            assert result.bubble_time == pytest.approx(pred.bubble_time)
            assert result.bubble_rate == pytest.approx(pred.bubble_rate(m, costs))
        if pred.holds_steady:
            assert result.steady_bubble == pytest.approx(pred.bubble_time)
    to_csv(schedule, tmp_path / "s.csv")
    assert from_csv(tmp_path / "s.csv") == schedule


@pytest.mark.parametrize("costs", [Costs(3, 2, 1), Costs(1, 2, 0.5), Costs(2, 1, 1)], ids=str)
@pytest.mark.parametrize("name", [n for n in SCHEDULES if n != "zb-v"])  # zb-v's form needs T_F = T_B
def test_closed_forms_under_other_costs(name: str, costs: Costs) -> None:
    chunks = 3 if name == "interleaved-1f1b" else 1
    result, pred = simulate(SCHEDULES[name](3, 9, chunks), costs), closed_form(name, 3, 9, chunks, costs)
    assert pred.holds_steady and result.steady_bubble == pytest.approx(pred.bubble_time)
    assert pred.holds == (name != "zb-h2" or costs.b >= 2 * costs.w)
    if pred.holds:
        assert result.bubble_time == pytest.approx(pred.bubble_time)


def test_zb_h2_is_bubble_free_per_rank_with_equal_costs() -> None:
    result = simulate(SCHEDULES["zb-h2"](4, 8), UNIFORM)
    assert result.span_idle == (0, 0, 0, 0)
    assert result.bubble_time == pytest.approx(3.0)  # the last rank still starts (p-1) T_F late


def test_split_backward_names_the_schedules_with_w(built: dict[Case, Schedule]) -> None:
    # ZeRO and the planner decide by name; every rank of these schedules runs W actions
    with_w = {
        case[0]
        for case, sched in built.items()
        if case[1] > 1 and all(any(a.kind == Kind.W for a in rank) for rank in sched)
    }
    without_w = {case[0] for case, sched in built.items() if all(a.kind != Kind.W for rank in sched for a in rank)}
    assert with_w == SPLIT_BACKWARD and not without_w & SPLIT_BACKWARD


def test_known_figures_for_p4_m8() -> None:
    rates = {
        name: simulate(
            SCHEDULES[name](4, 8, native_chunks(name, 2 if name.startswith("inter") else 1)), UNIFORM
        ).bubble_rate
        for name in SCHEDULES
    }
    assert rates == pytest.approx(
        {
            "gpipe": 9 / 33,
            "1f1b": 9 / 33,
            "interleaved-1f1b": 4.5 / 28.5,
            "zb-h1": 3 / 27,
            "zb-h2": 3 / 27,
            "zb-v": 1.5 / 25.5,
            "terapipe": 9 / 33,
        }
    )  # terapipe with one slice per sequence is GPipe with its backwards reversed


def test_zb_memory_includes_pending_w_state() -> None:
    assert simulate(SCHEDULES["zb-h1"](4, 8)).peak_until_w == (4, 4, 4, 4)
    assert simulate(SCHEDULES["zb-h2"](4, 8)).peak_until_w == (7, 7, 7, 7)
    assert simulate(SCHEDULES["interleaved-1f1b"](2, 4, 2)).peak_activations == (2.5, 1.5)


def test_comm_latency_delays_every_hop() -> None:
    costs = Costs(1, 1, 1, comm=0.5)
    result = simulate(SCHEDULES["1f1b"](2, 1), costs)
    assert result.makespan == pytest.approx(2 * 1 + 2 * 2 + 2 * 0.5)
    assert not closed_form("1f1b", 2, 1, 1, costs).holds


def test_group_steps_batches_consecutive_comms() -> None:
    rank1 = SCHEDULES["1f1b"](2, 3)[1]
    kinds = [sorted(rank1[i].kind.value for i in step) for step in group_steps(rank1)]
    assert ["RECV_F", "SEND_B"] in kinds  # steady state: a gradient out and the next input in, together
    assert all(len(step) == 1 for step in kinds if step[0] in ("F", "BW"))


def test_csv_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("rank,index,kind,stage,microbatch,peer\n0,0,X,0,0,\n")
    with pytest.raises(ScheduleError, match=r"bad.csv:2"):
        from_csv(path)
    path.write_text("rank,index,kind,stage,microbatch,peer\n0,0,F,0,0,\n0,2,BW,0,0,\n")
    with pytest.raises(ScheduleError, match="without gaps"):
        from_csv(path)
    path.write_text("rank,kind\n")
    with pytest.raises(ScheduleError, match="header"):
        from_csv(path)


def test_layouts() -> None:
    assert [stage_to_rank("interleaved-1f1b", 4, 2)(s) for s in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert Layout.infer(SCHEDULES["interleaved-1f1b"](2, 4, 2)) == Layout.looped(2, 2)
    with pytest.raises(ValueError, match="unknown schedule"):
        stage_to_rank("nope", 2, 1)
    with pytest.raises(ValueError, match="same number of stages"):
        Layout(2, (0, 0, 1))


@pytest.mark.parametrize(
    "name,args,message",
    [
        ("interleaved-1f1b", (4, 6, 2), "multiple of pp"),
        ("1f1b", (0, 4), ">= 1"),
        ("gpipe", (2, 4, 2), "one stage per rank"),
    ],
)
def test_builders_reject_bad_sizes(name: str, args: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SCHEDULES[name](*args)


# --- validation catches broken schedules ---------------------------------------------------------


def _one_f_one_b() -> Schedule:
    return SCHEDULES["1f1b"](2, 2)


def _drop(schedule: Schedule, rank: int, pred: Callable[[Action], bool]) -> Schedule:
    return [[a for a in acts if not (r == rank and pred(a))] for r, acts in enumerate(schedule)]


def _move_to_front(schedule: Schedule, rank: int, pred: Callable[[Action], bool]) -> Schedule:
    acts = schedule[rank]
    moved = [a for a in acts if pred(a)] + [a for a in acts if not pred(a)]
    return [moved if r == rank else list(a) for r, a in enumerate(schedule)]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda s: _drop(s, 0, lambda a: a.kind == Kind.F and a.microbatch == 1), "no forward"),
        (lambda s: _move_to_front(s, 1, lambda a: a.kind == Kind.BW and a.microbatch == 0), "comes before"),
        (lambda s: _drop(s, 1, lambda a: a.kind == Kind.RECV_F and a.microbatch == 1), r"RECV_F.* must be on rank 1"),
        (lambda s: [acts + [Action(Kind.SEND_F, 0, 0, 1)] if r == 0 else acts for r, acts in enumerate(s)], "repeats"),
        (lambda s: [acts + [Action(Kind.F, 1, 0)] if r == 0 else acts for r, acts in enumerate(s)], "lives on rank 1"),
        (lambda s: [acts + [Action(Kind.F, 0, 9)] if r == 0 else acts for r, acts in enumerate(s)], "out of range"),
    ],
)
def test_validate_rejects(mutate: Callable[[Schedule], Schedule], message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        validate_schedule(mutate(_one_f_one_b()), 2, 1, 2)


@pytest.mark.parametrize(
    "name,chunks,first,second",
    [
        ("zb-h1", 1, Action(Kind.B, 0, 0), Action(Kind.W, 0, 0)),
        ("interleaved-1f1b", 2, Action(Kind.F, 0, 0), Action(Kind.F, 1, 0)),  # both stages on the one rank
    ],
)
def test_validate_rejects_local_order(name: str, chunks: int, first: Action, second: Action) -> None:
    swap = {first: second, second: first}
    swapped = [[swap.get(a, a) for a in SCHEDULES[name](1, 2, chunks)[0]]]
    with pytest.raises(ScheduleError, match="comes before"):
        validate_schedule(swapped, 1, chunks, 2)


def test_validate_rejects_out_of_order_messages() -> None:
    schedule = SCHEDULES["gpipe"](2, 2)
    recvs = [i for i, a in enumerate(schedule[1]) if a.kind == Kind.RECV_F]
    # Both receives move ahead of both forwards, in swapped order: FIFO matching must notice.
    rest = [a for a in schedule[1] if a.kind != Kind.RECV_F]
    bad = [schedule[0], [schedule[1][recvs[1]], schedule[1][recvs[0]]] + rest]
    with pytest.raises(ScheduleError, match="pair up in order"):
        validate_schedule(bad, 2, 1, 2)


def test_validate_rejects_cross_rank_cycle() -> None:
    compute = [[a for a in acts if not a.kind.is_comm] for acts in SCHEDULES["1f1b"](2, 2)]
    # Rank 1 runs its second forward before its first backward, but rank 0 only sends that
    # forward after the first backward returns: each waits on the other.
    compute[0] = [Action(Kind.F, 0, 0), Action(Kind.BW, 0, 0), Action(Kind.F, 0, 1), Action(Kind.BW, 0, 1)]
    compute[1] = [Action(Kind.F, 1, 0), Action(Kind.F, 1, 1), Action(Kind.BW, 1, 0), Action(Kind.BW, 1, 1)]
    with pytest.raises(ScheduleError, match="dependency deadlock"):
        add_comms(compute, Layout.looped(2))


def _naive_comms(compute: Schedule, layout: Layout) -> Schedule:
    """Send right after the producer, receive right before the consumer: the obvious placement."""
    out: Schedule = []
    for acts in compute:
        row: list[Action] = []
        for a in acts:
            s, i = a.stage, a.microbatch
            if a.kind == Kind.F and s > 0:
                row.append(Action(Kind.RECV_F, s - 1, i, layout.rank_of(s - 1)))
            if a.kind in (Kind.B, Kind.BW) and s + 1 < layout.num_stages:
                row.append(Action(Kind.RECV_B, s + 1, i, layout.rank_of(s + 1)))
            row.append(a)
            if a.kind == Kind.F and s + 1 < layout.num_stages:
                row.append(Action(Kind.SEND_F, s, i, layout.rank_of(s + 1)))
            if a.kind in (Kind.B, Kind.BW) and s > 0:
                row.append(Action(Kind.SEND_B, s, i, layout.rank_of(s - 1)))
        out.append(row)
    return out


def test_naive_comm_placement_deadlocks_but_add_comms_does_not() -> None:
    schedule = SCHEDULES["zb-h2"](2, 4)
    compute = [[a for a in acts if not a.kind.is_comm] for acts in schedule]
    with pytest.raises(ScheduleError, match="deadlock under the execution contract"):
        validate_schedule(_naive_comms(compute, Layout.looped(2)), 2, 1, 4)
    assert add_comms(compute, Layout.looped(2)) == schedule
    check_deadlock(schedule)


# --- traces, plots, CLI --------------------------------------------------------------------------


def test_from_trace_reproduces_simulation() -> None:
    sim = simulate(SCHEDULES["zb-h1"](3, 6), PAPER)
    records = [
        [(s.kind.value, s.stage, s.microbatch, s.start + 100, s.end + 100) for s in sim.spans if s.rank == r]
        for r in range(sim.pp)
    ]
    records[0].append(("RECV_B", 1, 0, 100.0, 100.5))
    traced = from_trace(records)
    assert dataclasses.astuple(traced) == dataclasses.astuple(sim)
    assert traced.bubble_rate == pytest.approx(sim.bubble_rate)


def test_plot_writes_png_and_svg(tmp_path: Path) -> None:
    from meshtrain.tools.plot import plot_schedule

    result = simulate(SCHEDULES["interleaved-1f1b"](2, 4, 2))
    for suffix in (".png", ".svg"):
        path = plot_schedule(result, tmp_path / f"g{suffix}", "interleaved")
        assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="png or .svg"):
        plot_schedule(result, tmp_path / "g.pdf")


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="meshtrain")
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["schedule", *argv])
    return args.func(args)


def test_cli_reports_and_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path, png = tmp_path / "s.csv", tmp_path / "s.png"
    assert (
        _cli(
            "--pp",
            "4",
            "--microbatches",
            "8",
            "--schedule",
            "zb-h1",
            "--costs",
            "2,2,1",
            "--csv-out",
            str(csv_path),
            "--out",
            str(png),
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "bubble rate" in out and "18.37%" in out and png.exists()
    assert from_csv(csv_path) == SCHEDULES["zb-h1"](4, 8)


def test_cli_reads_compute_only_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "custom.csv"
    to_csv([[a for a in acts if not a.kind.is_comm] for acts in SCHEDULES["1f1b"](2, 3)], path)
    assert _cli("--csv-in", str(path)) == 0
    assert "custom schedule" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--pp", "4", "--microbatches", "8", "--schedule", "zbh1"], "did you mean 'zb-h1'"),
        (["--pp", "4", "--microbatches", "6", "--schedule", "interleaved-1f1b", "--chunks", "2"], "multiple of pp"),
        (["--pp", "0", "--microbatches", "8", "--schedule", "1f1b"], ">= 1"),
        (["--pp", "4", "--schedule", "1f1b"], "--microbatches required"),
        (["--pp", "2", "--microbatches", "2", "--schedule", "1f1b", "--costs", "1,2"], "three numbers"),
        (["--pp", "2", "--microbatches", "2", "--schedule", "1f1b", "--out", "x.pdf"], ".png or .svg"),
        (["--csv-in", "/nonexistent/s.csv"], "No such file"),
    ],
)
def test_cli_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
