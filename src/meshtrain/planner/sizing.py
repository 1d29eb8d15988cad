"""Compute-optimal model size for a FLOP budget.

Chinchilla (Hoffmann et al. 2022): C = 6 N D with D = 20 N, so N = sqrt(C / 120), D = 20 N.
Kaplan et al. 2020 (section 6.1): N_opt = 1.3e9 * (C / 1 PF-day)^0.73, D = C / (6 N); their
fit favours larger models trained on fewer tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshtrain.planner.errors import PlanError

PF_DAY = 1e15 * 86400  # FLOPs in one petaFLOP/s-day
TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class Sizing:
    rule: str
    params: float
    tokens: float
    flops: float


def _check(budget: float) -> None:
    if not math.isfinite(budget) or budget <= 0:
        raise PlanError(f"FLOP budget {budget} must be a positive number")


def chinchilla(budget: float) -> Sizing:
    _check(budget)
    params = math.sqrt(budget / (6 * TOKENS_PER_PARAM))
    return Sizing("chinchilla", params, TOKENS_PER_PARAM * params, budget)


def kaplan(budget: float) -> Sizing:
    _check(budget)
    params = 1.3e9 * (budget / PF_DAY) ** 0.73
    return Sizing("kaplan", params, budget / (6 * params), budget)
