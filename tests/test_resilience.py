"""Skipping bad steps, spotting stragglers, and the hang report, without processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import TINY
from meshtrain.accounting import CommStats
from meshtrain.config import load_config
from meshtrain.preflight import preflight
from meshtrain.resilience import StepGuard, Stragglers, TrainingStopped
from meshtrain.validate import validate
from meshtrain.watchdog import render

pytestmark = pytest.mark.pure


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run() -> None:
    guard = StepGuard(max_skipped=2)
    assert guard.check(1, 5.0, 1.0)
    assert not guard.check(2, math.nan, 1.0) and "loss nan" in guard.last_reason
    assert not guard.check(3, 4.0, math.inf) and "grad norm inf" in guard.last_reason
    assert guard.check(4, 4.0, 1.0) and guard.skipped == 2  # a good step resets the streak
    assert not guard.check(5, math.nan, 1.0) and not guard.check(6, math.nan, 1.0)
    with pytest.raises(TrainingStopped, match=r"3 consecutive steps skipped \(steps 5-7.*those of step 4"):
        guard.check(7, math.nan, 1.0)


def test_the_spike_rule_waits_for_half_a_window_then_skips_outliers() -> None:
    guard = StepGuard(max_skipped=5, sigma=6.0, window=8)
    losses = [3.0, 3.1, 2.9, 3.0]
    assert all(guard.check(i + 1, loss, 1.0) for i, loss in enumerate(losses))
    assert not guard.check(5, 3.5, 1.0)  # mean 3.0, std 0.07: 3.5 is 7 std above
    assert guard.check(6, 3.05, 1.0)
    no_rule = StepGuard(max_skipped=5)
    assert all(no_rule.check(i, loss, 1.0) for i, loss in enumerate([3.0, 3.0, 3.0, 3.0, 30.0]))


def test_a_rank_slower_than_the_factor_for_long_enough_is_named() -> None:
    stragglers = Stragglers(world=4, factor=1.5, steps=3, stats=CommStats())
    warnings = []
    for _ in range(3):
        figures, warning = stragglers.figures([0.10, 0.11, 0.25, 0.10])
        warnings.append(warning)
    assert warnings[:2] == [None, None] and warnings[2] is not None and "rank 2" in warnings[2]
    assert figures == pytest.approx(
        {"step_time_min_s": 0.10, "step_time_median_s": 0.105, "step_time_max_s": 0.25, "slowest_rank": 2}
    )


def _state(step: int, counts: dict[str, int], waiting: dict | None, activity: str = "computing step 3") -> str:
    return json.dumps(
        {
            "step": step,
            "activity": activity,
            "counts": counts,
            "recent": ["all_reduce #4 on dp[0, 1]"],
            "waiting": waiting,
        }
    )


def test_the_hang_report_names_the_rank_behind_and_where_everyone_is() -> None:
    group = "dp_shard[0, 1, 2]"
    waiting = {
        "entry": f"all_reduce #5 on {group} (1,024 bytes, data_parallel/ddp.py:87)",
        "group": group,
        "seq": 5,
        "for_s": 6.0,
    }
    states = {0: _state(3, {group: 5}, waiting), 1: _state(3, {group: 4}, None), 2: _state(3, {group: 5}, waiting)}
    text = render(0, states, {0: "File a.py, line 1", 1: 'File "faults.py", line 9 in maybe_fail'})
    lines = text.splitlines()
    assert lines[0].startswith("meshtrain watchdog: rank 0 has waited 6.0 s in all_reduce #5 on dp_shard[0, 1, 2]")
    assert lines[1].startswith("behind: rank 1, which issued 4 calls") and "is in no collective" in lines[1]
    assert sum(line.startswith("behind:") for line in lines) == 1
    assert "--- rank 1 ---" in text and "maybe_fail" in text


def test_far_more_ranks_than_cores_is_a_warning(tmp_path: Path) -> None:
    cfg = validate(
        load_config(
            TINY, [f"logging.run_dir={tmp_path / 'run'}", "training.global_batch=64", "training.micro_batch=1"]
        ),
        64,
    )
    (warning,) = preflight(cfg, 64, overwrite=False)
    assert "--nproc 64 runs 64 processes on" in warning and "of a core" in warning
    assert preflight(cfg, 1, overwrite=False) == []
