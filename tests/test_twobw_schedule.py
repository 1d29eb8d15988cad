"""PipeDream-2BW's per-step windows (no processes): deadlock-free under the execution contract, every
microbatch's forward and backward once per stage over a run of steps, 1F1B's activation bound, and
the simulated timeline against 1F1B's; its configuration refusals, one line each."""

from __future__ import annotations

import pytest

from conftest import config_error
from meshtrain.pipeline.schedules import Action, Kind, Layout, Schedule, one_f_one_b, two_bw_window
from meshtrain.tools.schedule_check import check_deadlock, validate_schedule
from meshtrain.tools.simulator import Costs, simulate_steps

pytestmark = pytest.mark.pure
COSTS = Costs(1, 2, 0)  # F, then a fused backward twice as long (BW = b + w)


def windows(pp: int, m: int, steps: int) -> list[Schedule]:
    return [two_bw_window(pp, m, k == 0, k == steps - 1) for k in range(steps)]


@pytest.mark.parametrize("pp", [2, 3, 4, 5])
def test_windows_cover_the_stream_once_without_deadlock(pp: int) -> None:
    for m in (pp, pp + 1, 2 * pp + 1):
        for steps in (1, 2, 4):
            seen: dict[tuple[Kind, int, int], int] = {}
            for k, window in enumerate(windows(pp, m, steps)):
                check_deadlock(window)
                for rank, actions in enumerate(window):
                    for a in actions:
                        if a.kind.is_comm:
                            continue
                        assert a.stage == rank
                        key = (a.kind, a.stage, (k - 1) * m + a.microbatch)  # ids 0..m-1: the previous batch
                        assert key not in seen, f"{key} runs twice"
                        if a.kind == Kind.BW:
                            assert (Kind.F, a.stage, key[2]) in seen  # after its forward, on this rank
                        seen[key] = k
            every = {(kind, s, i) for kind in (Kind.F, Kind.BW) for s in range(pp) for i in range(steps * m)}
            assert set(seen) == every
            # a batch's forwards all run in its own step (they use the version made just before it)
            assert all(seen[(Kind.F, s, i)] == i // m for s in range(pp) for i in range(steps * m))


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_a_run_of_windows_is_one_valid_schedule(pp: int) -> None:
    """The windows of a whole run, joined with the microbatch ids made global, are one flush-free
    schedule over steps * m microbatches that the existing validator accepts: every compute once,
    in order on each rank, every message matched, and no deadlock under the execution contract."""
    for m, steps in ((pp, 3), (pp + 2, 2)):
        joined: Schedule = [[] for _ in range(pp)]
        for k, window in enumerate(windows(pp, m, steps)):
            for rank, actions in enumerate(window):
                joined[rank] += [Action(a.kind, a.stage, (k - 1) * m + a.microbatch, a.peer) for a in actions]
        validate_schedule(joined, pp, 1, steps * m, Layout.looped(pp))


def test_no_flush_leaves_only_the_fill_per_step() -> None:
    """Each further step costs m(f+b) plus the fill (pp-1)f the step-end barrier brings back, where
    1F1B's flush costs (pp-1)(f+b); in-flight microbatches stay 1F1B's pp - r on rank r."""
    f, b = COSTS.f, COSTS.b + COSTS.w
    for pp, m in ((2, 4), (4, 4), (4, 8)):
        two = [simulate_steps(windows(pp, m, t), m, COSTS, carried=1).makespan for t in (4, 5)]
        flush = [simulate_steps([one_f_one_b(pp, m)] * t, m, COSTS).makespan for t in (4, 5)]
        assert two[1] - two[0] == pytest.approx(m * (f + b) + (pp - 1) * f)
        assert flush[1] - flush[0] == pytest.approx(m * (f + b) + (pp - 1) * (f + b))
        peaks = simulate_steps(windows(pp, m, 5), m, COSTS, carried=1).peak_activations
        assert peaks == tuple(float(pp - r) for r in range(pp))


TWO_BW = ("parallel.pp=2", "parallel.pp_schedule=2bw", "model.n_layers=4", "checkpoint.resume=never")


@pytest.mark.parametrize(
    ("extra", "world", "says"),
    [
        (("training.global_batch=4", "training.micro_batch=4"), 2, "training.grad_accum >= parallel.pp"),
        (("parallel.tp=2",), 4, "parallel.tp=2"),
        (("parallel.zero_stage=1",), 4, "parallel.zero_stage=1"),
        (("optimizer.name=onebit_adam", "optimizer.freeze_step=2"), 2, "optimizer.name='onebit_adam'"),
        (("checkpoint.resume=auto",), 2, "checkpoint.resume='auto'"),
    ],
)
def test_unsupported_combinations_are_refused(extra: tuple[str, ...], world: int, says: str) -> None:
    message = config_error(world, *TWO_BW, *extra)
    assert says in message and "pp_schedule=2bw" in message
