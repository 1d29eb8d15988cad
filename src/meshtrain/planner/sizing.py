"""Compute-optimal model size for a FLOP budget.

Chinchilla (Hoffmann et al. 2022): C = 6 N D with D = 20 N, so N = sqrt(C / 120), D = 20 N.
Kaplan et al. 2020 (section 6.1): N_opt = 1.3e9 * (C / 1 PF-day)^0.73, D = C / (6 N); their
fit favours larger models trained on fewer tokens.
Hoffmann et al.'s parametric fit (their approach 3), L(N, D) = E + A/N^alpha + B/D^beta, gives the
allocation in closed form (`LossFit.optimum`); `meshtrain scaling` fits the same law to runs here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshtrain.planner.errors import PlanError

PF_DAY = 1e15 * 86400  # FLOPs in one petaFLOP/s-day
TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class LossFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, in nats per token (Hoffmann et al. 2022, eq. 2)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def optimum(self, budget: float) -> Sizing:
        """The N and D = C / (6N) minimising L at C = 6ND: setting dL/dN = 0 along D = C/(6N) gives
        N* = G (C/6)^a, D* = (C/6)^b / G, a = beta/(alpha+beta), b = alpha/(alpha+beta),
        G = (alpha A / (beta B))^(1/(alpha+beta))."""
        _check(budget)
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        params = g * (budget / 6) ** (self.beta / s)
        return Sizing("fit", params, budget / (6 * params), budget)


# Hoffmann et al. 2022, approach 3 (their eq. 10), fitted with a Huber loss on log L.
HOFFMANN = LossFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


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
