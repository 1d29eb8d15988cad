"""Compute-optimal sizing."""

from __future__ import annotations

import pytest

from meshtrain.config import ConfigError
from meshtrain.planner.sizing import PF_DAY, chinchilla, kaplan

pytestmark = pytest.mark.pure


def test_chinchilla_for_gophers_budget() -> None:
    # C = 5.76e23: N = sqrt(C / 120) = sqrt(4.8e21) = 6.93e10, D = 20 N = 1.39e12 (Chinchilla: 70B, 1.4T)
    s = chinchilla(5.76e23)
    assert s.params == pytest.approx(6.928e10, rel=1e-3)
    assert s.tokens == pytest.approx(1.3856e12, rel=1e-3)
    assert 6 * s.params * s.tokens == pytest.approx(5.76e23)


def test_kaplan_alternative() -> None:
    # one PF-day: N = 1.3e9 * 1^0.73; ten times the compute: 10^0.73 = 5.37 times the params
    assert kaplan(PF_DAY).params == pytest.approx(1.3e9)
    assert kaplan(10 * PF_DAY).params / kaplan(PF_DAY).params == pytest.approx(10**0.73)
    s = kaplan(5.76e23)
    assert 6 * s.params * s.tokens == pytest.approx(5.76e23)
    assert s.params > chinchilla(5.76e23).params  # Kaplan favours bigger models


def test_bad_budget() -> None:
    with pytest.raises(ConfigError):
        chinchilla(-1.0)
