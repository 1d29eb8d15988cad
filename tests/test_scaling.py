"""`meshtrain scaling`: the L(N, D) fitter recovers constants from losses made by the formula written
here, the compute-optimal allocation matches a hand computation and a brute-force scan, the grid
plan matches the parameter count written here, and a micro-grid runs through the CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from meshtrain.cli import main
from meshtrain.planner.sizing import LossFit
from meshtrain.tools.scaling import fit_law, plan_grid


def law(n: float, d: float) -> float:
    return 1.3 + 45.0 / n**0.42 + 120.0 / d**0.31


@pytest.mark.pure
def test_fit_recovers_known_constants_from_noisy_losses() -> None:
    rng = random.Random(7)
    ns, ds, ls = [], [], []
    for c in (1e10, 3e10, 1e11, 3e11):
        for n in (3e3, 1e4, 3e4, 1e5):
            ns.append(n)
            ds.append(c / (6 * n))
            ls.append(law(n, c / (6 * n)) * (1 + rng.gauss(0, 0.001)))
    fit, rms = fit_law(ns, ds, ls)
    assert rms < 0.01
    assert fit.alpha == pytest.approx(0.42, abs=0.05) and fit.beta == pytest.approx(0.31, abs=0.03)
    floor = fit.E  # the irreducible loss
    assert floor == pytest.approx(1.3, abs=0.1)
    # the fitted law predicts fresh points, off the grid, as the true one does
    for n, d in ((5e3, 2e6), (2e5, 5e4)):
        assert fit.loss(n, d) == pytest.approx(law(n, d), rel=0.01)


@pytest.mark.pure
def test_optimal_allocation_by_hand_and_by_scan() -> None:
    # alpha = beta = 1/2, A = B: G = 1, so N* = D* = sqrt(C / 6)
    sym = LossFit(E=2.0, A=10.0, B=10.0, alpha=0.5, beta=0.5).optimum(6e10)
    assert sym.params == pytest.approx(1e5) and sym.tokens == pytest.approx(1e5)
    # Hoffmann et al.'s constants: a brute-force scan of L(N, C / 6N) over N finds the same minimum
    h = LossFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    c = 1e21
    best = min((10 ** (6 + i / 2000) for i in range(12000)), key=lambda n: h.loss(n, c / (6 * n)))
    opt = h.optimum(c)
    assert opt.params == pytest.approx(best, rel=0.005) and opt.tokens == pytest.approx(c / (6 * best), rel=0.005)
    # N* grows as C^(beta / (alpha + beta))
    assert h.optimum(10 * c).params / opt.params == pytest.approx(10 ** (0.28 / 0.62))


def blocks(dim: int, layers: int) -> int:
    """A Llama block with n_kv_heads = n_heads: q, k, v, o (4 d^2), SwiGLU (3 d f), two RMSNorms."""
    ffn = 64 * math.ceil(int(8 * dim / 3) / 64)
    return layers * (4 * dim * dim + 3 * dim * ffn + 2 * dim)


@pytest.mark.pure
def test_grid_plan_budgets_to_sizes_tokens_and_steps() -> None:
    points = plan_grid([1e10, 3e10], [4e3, 16e3, 55e3])
    assert [(p.dim, p.n_layers) for p in points[:3]] == [(16, 1), (32, 1), (48, 2)]
    for p in points:
        assert p.params == blocks(p.dim, p.n_layers)
        assert p.steps == round(p.budget / (6 * p.params) / 1024) and p.tokens == 1024 * p.steps
        assert 6 * p.params * p.tokens == pytest.approx(p.budget, rel=0.02)


@pytest.mark.pure
@pytest.mark.parametrize(
    "args, message",
    [
        (["--nproc", "2"], "--nproc 2: the grid trains in-process"),
        (["--sizes", "4k,lots"], "'lots' is not a number"),
        (["--budgets", "1e9", "--sizes", "55k"], "the model of N = 55,488 only 3 steps of 1024 tokens"),
        (["--budgets", "1e10", "--sizes", "4k,16k"], "2 grid points for a fit of 5 unknowns"),
    ],
)
def test_bad_grid_is_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scaling", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


@pytest.mark.e2e
def test_micro_grid_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, run = tmp_path / "s.png", tmp_path / "run"
    argv = ["scaling", "--budgets", "3.5e9,7e9", "--sizes", "4k,16k,55k", "--max-tokens", "300000"]
    assert main([*argv, "--json", "--out", str(png), "--run-dir", str(run)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep == json.loads((run / "scaling.json").read_text())
    assert [(p["budget"], p["params"]) for p in rep["points"]] == [
        (c, n) for c in (3.5e9, 7e9) for n in (blocks(16, 1), blocks(32, 1), blocks(48, 2))
    ]
    # learning happened: every held-out loss is below uniform guessing over bytes, ln 256, and each
    # size, trained on twice the tokens at twice the budget, ends lower on the held-out text
    losses = [p["loss"] for p in rep["points"]]
    assert all(0 < v < math.log(256) for v in losses)
    assert all(twice < once for once, twice in zip(losses[:3], losses[3:]))
    f = rep["fit"]
    assert [r["tokens_per_param"] for r in rep["frontier"]] == pytest.approx(
        [LossFit(f["E"], f["A"], f["B"], f["alpha"], f["beta"]).optimum(c).tokens ** 2 / c * 6 for c in (3.5e9, 7e9)]
    )
    assert png.stat().st_size > 10_000
