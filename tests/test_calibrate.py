"""`bench-comm --calibrate`'s arithmetic against oracles written here: the alpha-beta fit recovers
constants from synthetic timings, the cluster TOML it writes round-trips through load_cluster, and
the planner's collective time then follows the fitted line (and not the ring model's presets)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from meshtrain.planner.comm import collective_time
from meshtrain.planner.layout import Group
from meshtrain.planner.presets import CLUSTERS, CommFit, load_cluster
from meshtrain.tools.calibrate import Fit, cluster_toml, fit_alpha_beta, fit_rows

pytestmark = pytest.mark.pure
SIZES = [float(2**k) for k in range(10, 25)]  # 1 KiB .. 16 MiB


def test_the_fit_recovers_alpha_and_beta_from_synthetic_timings() -> None:
    alpha, beta = 40e-6, 2.5e9
    exact = fit_alpha_beta(SIZES, [alpha + x / beta for x in SIZES])
    assert exact.alpha == pytest.approx(alpha, rel=1e-9) and exact.beta == pytest.approx(beta, rel=1e-9)
    assert exact.r2 == pytest.approx(1.0) and exact.max_rel_residual < 1e-9
    # +-4% multiplicative noise, alternating: the relative weighting keeps both ends of the sweep
    noisy = [(alpha + x / beta) * (1.04 if i % 2 else 0.96) for i, x in enumerate(SIZES)]
    got = fit_alpha_beta(SIZES, noisy)
    assert got.alpha == pytest.approx(alpha, rel=0.08) and got.beta == pytest.approx(beta, rel=0.08)
    assert 0.9 < got.r2 < 1.0 and 0.03 < got.max_rel_residual < 0.06
    # unweighted least squares would let the 16 MiB point swamp alpha: on the same noise it misses by far more
    n, sx, sy = len(SIZES), sum(SIZES), sum(noisy)
    slope = (n * sum(x * t for x, t in zip(SIZES, noisy)) - sx * sy) / (n * sum(x * x for x in SIZES) - sx * sx)
    assert abs((sy - slope * sx) / n - alpha) > 10 * abs(got.alpha - alpha)
    # a line that would need a negative alpha is pinned at zero; a flat one is a pure latency
    through_origin = fit_alpha_beta([1e4, 1e6], [9e-6, 0.999e-3])  # exactly -1 us + bytes / 1 GB/s
    assert through_origin.alpha == 0.0 and 1e6 / 0.999e-3 < through_origin.beta < 1e4 / 9e-6
    flat = fit_alpha_beta([1e3, 1e6], [5e-5, 4e-5])
    assert flat.alpha == pytest.approx(4.5e-5, rel=0.05) and flat.beta > 1e15


def _rows(op: str, ranks: int, alpha: float, beta: float) -> list[dict]:
    return [{"op": op, "ranks": ranks, "bytes": int(x), "time_us": (alpha + x / beta) * 1e6} for x in SIZES]


def test_the_written_toml_round_trips_through_load_cluster(tmp_path: Path) -> None:
    rows = _rows("all_reduce", 4, 120e-6, 0.8e9) + _rows("all_reduce", 2, 50e-6, 1.6e9)
    rows += _rows("send_recv", 4, 30e-6, 3e9) + _rows("broadcast", 4, 60e-6, 1e9)
    info = {
        "nproc": 4,
        "backend": "gloo",
        "dtype": "fp32",
        "sizes": "1K:16M",
        "iters": 10,
        "when": "now",
        "host": "here",
        "cores": 2,
        "affinity": 2,
        "alone": 80e9,
        "busy": 35e9,
        "name": "bench-4",
        "memory_gib": 3.5,
    }
    path = tmp_path / "mine.toml"
    path.write_text(cluster_toml(fit_rows(rows), info))
    c = load_cluster(str(path))
    assert (c.name, c.peak_tflops, c.memory_gib, c.gpus_per_node, c.precision) == ("bench-4", 0.035, 3.5, 4, "fp32")
    # the ring fallback from the 4-rank all-reduce: 2(n-1) = 6 latency steps, bus factor 2(n-1)/n = 1.5
    assert c.intra_latency_us == pytest.approx(20.0, rel=1e-4) and c.intra_bw_gbs == pytest.approx(1.2, rel=1e-4)
    cpu = CLUSTERS["cpu"]
    assert (c.efficiency, c.hbm_bw_gbs, c.inter_bw_gbs) == (cpu.efficiency, cpu.hbm_bw_gbs, cpu.inter_bw_gbs)
    got = {(f.op, f.ranks): (f.alpha_us, f.beta_gbs, f.r2) for f in c.collectives}
    assert set(got) == {("all_reduce", 2), ("all_reduce", 4), ("p2p", 4)}  # broadcast has no planner kind
    for key, (a_us, b_gbs) in {
        ("all_reduce", 2): (50, 1.6),
        ("all_reduce", 4): (120, 0.8),
        ("p2p", 4): (30, 3),
    }.items():
        assert got[key][0] == pytest.approx(a_us, rel=1e-4) and got[key][1] == pytest.approx(b_gbs, rel=1e-4)
        assert got[key][2] == pytest.approx(1.0)
    assert "cores seen: 2" in path.read_text() and "35.00 G with all 4 ranks busy" in path.read_text()
    assert (c.cores, c.calibrated_ranks) == (2, 4)  # what planner/contention.py rescales from
    measured = load_cluster(str(_written(tmp_path, rows, {**info, "efficiency": 0.65})))
    assert measured.efficiency == 0.65  # the op-mix probe's, when there is one
    assert c.fit_for("all_reduce", 8) == c.fit_for("all_reduce", 4) and c.fit_for("all_gather", 2) is None


def test_the_planner_times_collectives_with_the_fits() -> None:
    fits = (CommFit("all_reduce", 2, 50.0, 1.6), CommFit("all_reduce", 4, 120.0, 0.8))
    c = dataclasses.replace(CLUSTERS["cpu"], collectives=fits)
    payload = 8e6
    assert collective_time("all_reduce", payload, Group(4, False), c) == pytest.approx(120e-6 + payload / 0.8e9)
    # bucketed: each of the 4 calls pays alpha again
    assert collective_time("all_reduce", payload, Group(2, False), c, bucket=2e6) == pytest.approx(
        4 * 50e-6 + payload / 1.6e9
    )
    # 8 ranks, from the 4-rank fit: alpha x 14/6 latency steps, bus bandwidth 0.8 x 1.5 over 2 x 7/8
    assert collective_time("all_reduce", payload, Group(8, False), c) == pytest.approx(
        120e-6 * 14 / 6 + payload / (0.8e9 * 1.5 / 1.75)
    )
    # no fit for the op, or a group leaving the node: the ring model on the preset's numbers
    ring = 3 * c.intra_latency_us * 1e-6 + 0.75 * payload / (c.intra_bw_gbs * 1e9)
    assert collective_time("all_gather", payload, Group(4, False), c) == pytest.approx(ring)
    inter = 6 * c.inter_latency_us * 1e-6 + 1.5 * payload / (c.inter_bw_gbs * 1e9)
    assert collective_time("all_reduce", payload, Group(4, True), c) == pytest.approx(inter)


def test_a_bad_fit_entry_is_named(tmp_path: Path) -> None:
    from meshtrain.config import ConfigError

    path = tmp_path / "bad.toml"
    path.write_text(
        '[cluster]\nbase = "cpu"\ncollectives = [{ op = "allreduce", ranks = 2, alpha_us = 1.0, beta_gbs = 1.0 }]\n'
    )
    with pytest.raises(ConfigError, match="op='allreduce' ranks=2 .* op must be one of all_reduce"):
        load_cluster(str(path))
    assert Fit(1e-6, 1e9, 1.0, 0.0).predict(1e9) == pytest.approx(1.000001)


def _written(tmp_path: Path, rows: list[dict], info: dict) -> Path:
    path = tmp_path / "probed.toml"
    path.write_text(cluster_toml(fit_rows(rows), info))
    return path


def test_contention_rescales_a_calibration_to_another_rank_count() -> None:
    from meshtrain.planner.contention import on_shared_cores, shared
    from meshtrain.planner.layout import Layout

    # calibrated with 4 ranks on 2 cores: each rank had half a core; on 2 ranks each has a whole one
    fit2, fit4 = CommFit("all_reduce", 2, 100.0, 1.0), CommFit("all_reduce", 4, 500.0, 0.5)
    cal = dataclasses.replace(CLUSTERS["cpu"], peak_tflops=0.05, cores=2, calibrated_ranks=4, collectives=(fit2, fit4))
    assert shared(cal, 2).peak_tflops == pytest.approx(0.1) and shared(cal, 4).peak_tflops == pytest.approx(0.05)
    # the 2-rank fit was measured with 2 processes alive: in a 4-rank run they take turns with 2 more
    f2, f4 = shared(cal, 4).collectives
    assert (f2.alpha_us, f2.beta_gbs) == (pytest.approx(200.0), pytest.approx(0.5)) and f4 == fit4
    assert shared(CLUSTERS["cpu"], 8) == CLUSTERS["cpu"]  # a preset shares nothing
    times = {"compute": 0.18, "recompute": 0.0, "pipeline bubble": 0.09, "pp p2p": 0.004}
    pp = Layout(pp=2, dp_shard=2)
    # 4 ranks on 2 cores: the machine's work over its cores (0.18) beats (0.18 + 0.09) / 2
    assert on_shared_cores(times, pp, cal, 4)["pipeline bubble"] == 0.0
    assert on_shared_cores(times, pp, cal, 2) == times  # one core per rank: the bubble is idle time
    tp = dataclasses.replace(cal, efficiency=0.6)
    # only the matmul share (0.6) of the tp-divided compute shrinks with tp=2: 0.1 x (0.6 + 0.4 x 2)
    got = on_shared_cores({"compute": 0.1, "recompute": 0.0}, Layout(tp=2), tp, 2)
    assert got["compute"] == pytest.approx(0.14)
