"""ZB-V on its own (no processes): the V placement, the schedule's checks, its bubble and memory
against formulas written here, and how the CLI and the config take it. The executor runs it against
the single-device model in test_pipeline_gloo.py (pp 2 and 4) and test_pipeline_equivalence.py."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from conftest import config_error
from meshtrain.pipeline.schedules import SCHEDULES, Layout, build_schedule, stage_to_rank, zb_v
from meshtrain.tools import schedule_cli
from meshtrain.tools.schedule_check import check_deadlock, validate_schedule
from meshtrain.tools.simulator import Costs, closed_form, simulate

pytestmark = pytest.mark.pure
SIZES = [(p, m) for p in (2, 3, 4, 5) for m in sorted({1, 2, p, 2 * p - 1, 2 * p, 3 * p + 1})]


def test_the_v_placement() -> None:
    # stages go down the ranks and come back: rank 0 holds the first and the last stage
    assert Layout.v(4).ranks == (0, 1, 2, 3, 3, 2, 1, 0)
    assert [stage_to_rank("zb-v", 3)(s) for s in range(6)] == [0, 1, 2, 2, 1, 0]
    schedule, layout = build_schedule("zb-v", 4, 8, 2)
    assert layout == Layout.v(4) == Layout.infer(schedule)


@pytest.mark.parametrize("p,m", SIZES)
def test_zb_v_is_complete_ordered_and_deadlock_free(p: int, m: int) -> None:
    schedule = zb_v(p, m)
    validate_schedule(schedule, p, 2, m, Layout.v(p))
    check_deadlock(schedule)
    # 2p-1 stage boundaries, all but the local hand-off on rank p-1 (stage p-1 to p) crossing ranks;
    # each carries, per microbatch, an activation and a gradient: a SEND and a RECV apiece
    assert sum(a.kind.is_comm for rank in schedule for a in rank) == 2 * 2 * (2 * p - 2) * m


@pytest.mark.parametrize("f,w", [(1, 1), (2, 1), (2, 0.5), (3, 2), (2, 0)])
@pytest.mark.parametrize("p", [2, 3, 4, 5])
def test_bubble_when_forward_and_input_backward_cost_the_same(p: int, f: float, w: float) -> None:
    """Chunk costs are half a full stage's: T = f/2 for F and B, w/2 for W. Per rank the bubble is
    (p-1)(T_F + T_B - 2T_W); the makespan adds the last rank's late start, (p-1)T_F, when larger."""
    costs, tf, tw = Costs(f, f, w), f / 2, w / 2
    for m in (2 * p - 1, 3 * p + 1):
        result, pred = simulate(zb_v(p, m), costs), closed_form("zb-v", p, m, 2, costs)
        steady = (p - 1) * (tf + tf - 2 * tw)
        assert result.steady_bubble == pytest.approx(steady)
        assert result.bubble_time == pytest.approx(max((p - 1) * tf, steady))
        assert pred.holds_steady and pred.bubble_time == pytest.approx(steady)
        assert pred.holds == (f >= 2 * w)


def test_zero_bubble_per_rank_with_equal_costs() -> None:
    for p, m in [(2, 3), (4, 7), (4, 8), (5, 16)]:
        result = simulate(zb_v(p, m), Costs(1, 1, 1))
        assert result.span_idle == (0,) * p  # no rank waits between its first action and its last
        assert result.makespan == pytest.approx((6 * m + p - 1) / 2)  # in chunk costs: 6m + (p-1)


@pytest.mark.parametrize("p,m", SIZES)
def test_peak_activations_are_1f1bs(p: int, m: int) -> None:
    """At most p full-stage microbatches (2p chunk halves) wait for B on a rank: 1F1B's rank-0 peak,
    which ZB-V reaches on every rank once m >= 2p - 1."""
    ours, one_f_one_b = simulate(zb_v(p, m)), simulate(SCHEDULES["1f1b"](p, m))
    assert ours.peak == one_f_one_b.peak == min(p, m)
    if m >= 2 * p - 1:
        assert ours.peak_activations == (p,) * p


def test_unequal_f_and_b_are_flagged_not_predicted() -> None:
    pred = closed_form("zb-v", 4, 8, 2, Costs(3, 2, 1))
    assert not pred.holds and not pred.holds_steady and "T_F = T_B" in pred.assumption
    assert not closed_form("zb-v", 4, 6, 2, Costs(1, 1, 1)).holds_steady  # m < 2p - 1


def test_zb_v_needs_two_chunks() -> None:
    with pytest.raises(ValueError, match="chunks=2"):
        zb_v(4, 8, 1)
    assert "set parallel.pp_chunks=2" in config_error(2, "parallel.pp=2", "parallel.pp_schedule=zb-v")
    message = config_error(2, "parallel.pp=2", "parallel.pp_schedule=zb-v", "parallel.pp_chunks=3", "model.n_layers=6")
    assert "parallel.pp_schedule=zb-v" in message and "parallel.pp_chunks=3" in message


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="meshtrain")
    schedule_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["schedule", *argv])
    return args.func(args)


def test_cli_runs_zb_v_with_its_two_chunks(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("--pp", "4", "--microbatches", "8", "--schedule", "zb-v", "--costs", "2,2,1") == 0
    assert "6.98%" in capsys.readouterr().out  # bubble 3 of a 43 makespan, as the closed form says
    assert _cli("--pp", "4", "--microbatches", "8", "--schedule", "zb-v", "--chunks", "3") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop --chunks 3" in err


def test_plot_schedules_stacks_several(tmp_path: Path) -> None:
    from meshtrain.tools.plot import plot_schedules

    runs = [(name, simulate(SCHEDULES[name](2, 4, 2 if name == "zb-v" else 1))) for name in ("1f1b", "zb-v")]
    path = plot_schedules(runs, tmp_path / "both.svg")
    assert path.read_text().count("bubble ") == 2  # one titled chart per schedule
