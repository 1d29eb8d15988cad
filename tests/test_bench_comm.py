"""`meshtrain bench-comm` through the CLI on 2 gloo ranks: one checked row per op and size, and the
bandwidths follow nccl-tests' definitions (written here); a bad --ops is one line before any spawn.
The same run calibrates (--calibrate): `meshtrain plan --cluster` takes the TOML it writes."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, cli
from meshtrain.cli import main

pytestmark = pytest.mark.e2e
FACTOR = {"all_reduce": 1.0, "all_gather": 0.5, "all_to_all": 0.5, "send_recv": 1.0, "all_gather_int8": 0.5}  # n = 2


def test_bench_comm_times_checks_and_reports_bus_bandwidth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ops, toml = ",".join(FACTOR), str(tmp_path / "here.toml")
    proc = cli(
        "bench-comm", "--nproc", "2", "--sizes", "1K:2K", "--ops", ops, "--iters", "2", "--json", "--calibrate", toml
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert [(r["op"], r["bytes"]) for r in rows] == [(op, size) for op in FACTOR for size in (1024, 2048)]
    for r in rows:
        assert r["ok"] and r["ranks"] == 2 and r["backend"] == "gloo" and 0 < r["min_us"] <= r["time_us"]
        assert r["algbw"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e-6) / 1e9)
        assert r["busbw"] == pytest.approx(r["algbw"] * FACTOR[r["op"]])
    bad = cli("bench-comm", "--ops", "all_reduce,allgather")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "--ops 'all_reduce,allgather': unknown ['allgather']" in bad.stderr
    # the calibration: a fit per op (stderr, so stdout stays JSON), and a cluster the planner runs on
    assert "# calibration:" in proc.stderr and "all_to_all     2" in proc.stderr
    # in this process, to save two interpreter starts
    assert main(["plan", "--cluster", toml, "--config", str(ROOT / "configs/tiny.toml"), "--nproc", "2", "--json"]) == 0
    cluster = json.loads(capsys.readouterr().out)["cluster"]
    assert cluster["name"] == "calibrated-2x-gloo-fp32" and cluster["gpus_per_node"] == 2
    # the measured peak, not tiny.toml's logging.peak_tflops = 1.0 (that only stands in for the default cluster)
    assert cluster["peak_tflops"] == tomllib.loads(Path(toml).read_text())["cluster"]["peak_tflops"] < 1.0
    assert {(f["op"], f["ranks"]) for f in cluster["collectives"]} == {
        (k, 2) for k in ("all_reduce", "all_gather", "all_to_all", "p2p")
    }
    assert main(["bench-comm", "--sizes", "4K", "--calibrate", toml]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--calibrate" in err and "at least two sizes" in err
