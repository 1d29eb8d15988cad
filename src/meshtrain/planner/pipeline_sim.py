"""The pipeline simulator as the planner's source of bubble time and in-flight microbatches.

The closed forms (timing.bubble_time, memory.in_flight_microbatches) hold only under their
assumptions; ZB-H2's makespan bubble, for one, is (p-1)T_F rather than 0 when T_F = T_B = T_W. So
where a schedule is small enough to simulate, the planner uses meshtrain.tools.simulator: the
same action lists the executor runs. With zero communication latency a timeline scales linearly
with its costs, so results are cached on the cost ratios and rescaled.
"""

from __future__ import annotations

from functools import lru_cache

from meshtrain.pipeline.schedules import SCHEDULES, build_schedule, is_custom
from meshtrain.tools.simulator import Costs, simulate

# Compute actions (about 3 per stage and microbatch) beyond which the closed forms are used instead:
# a 16-stage, 64-microbatch schedule simulates in ~50 ms; a search meets many distinct shapes.
MAX_ACTIONS = 4096


def _simulable(schedule: str, p: int, v: int, m: int) -> bool:
    if p < 2 or 3 * p * v * m > MAX_ACTIONS or not (schedule in SCHEDULES or is_custom(schedule)):
        return False
    return schedule != "interleaved-1f1b" or m % p == 0


@lru_cache(maxsize=1024)
def _run(schedule: str, p: int, v: int, m: int, b: float, w: float) -> tuple[float, tuple[float, ...]]:
    result = simulate(build_schedule(schedule, p, m, v)[0], Costs(f=1.0, b=b, w=w))
    return result.bubble_time, result.peak_activations


def simulated_bubble(schedule: str, p: int, v: int, m: int, t_f: float, t_b: float, t_w: float) -> float | None:
    """Idle time per step (t_b is the whole backward, B + W), or None where not simulated."""
    if t_f <= 0 or not _simulable(schedule, p, v, m):
        return None
    bubble, _ = _run(schedule, p, v, m, round((t_b - t_w) / t_f, 3), round(t_w / t_f, 3))
    return bubble * t_f


def simulated_in_flight(schedule: str, p: int, v: int, m: int, rank: int) -> float | None:
    """Peak microbatches of activations held by pipeline rank `rank` (cost-independent)."""
    if not _simulable(schedule, p, v, m):
        return None
    return _run(schedule, p, v, m, 1.0, 1.0)[1][rank]
