"""`meshtrain bench-comm` through the CLI on 2 gloo ranks: one checked row per op and size, and the
bandwidths follow nccl-tests' definitions (written here); a bad --ops is one line before any spawn."""

from __future__ import annotations

import json

import pytest

from conftest import cli

pytestmark = pytest.mark.e2e
FACTOR = {"all_reduce": 1.0, "all_gather": 0.5, "all_to_all": 0.5, "send_recv": 1.0, "all_gather_int8": 0.5}  # n = 2


def test_bench_comm_times_checks_and_reports_bus_bandwidth() -> None:
    ops = ",".join(FACTOR)
    proc = cli("bench-comm", "--nproc", "2", "--sizes", "1K:2K", "--ops", ops, "--iters", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert [(r["op"], r["bytes"]) for r in rows] == [(op, size) for op in FACTOR for size in (1024, 2048)]
    for r in rows:
        assert r["ok"] and r["ranks"] == 2 and 0 < r["min_us"] <= r["time_us"]
        assert r["algbw"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e-6) / 1e9)
        assert r["busbw"] == pytest.approx(r["algbw"] * FACTOR[r["op"]])
    bad = cli("bench-comm", "--ops", "all_reduce,allgather")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "--ops 'all_reduce,allgather': unknown ['allgather']" in bad.stderr
