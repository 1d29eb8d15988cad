"""`meshtrain bench-comm --backend mpi` (mpi4py on mpich, launched by mpiexec): one checked row per op
and size whose bandwidths follow nccl-tests' definitions (written here), as the gloo rows do; without
mpi4py the command is refused in one line that says how to install it, before anything starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import cli
from meshtrain.cli import main
from meshtrain.tools import bench_comm
from meshtrain.tools.bench_comm_mpi import missing

pytestmark = pytest.mark.e2e
NCCL_TESTS = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n}


def test_mpi_backend_rows_are_checked_and_read_like_gloos() -> None:
    assert missing() is None, missing()  # the test extra installs mpich and mpi4py: never skipped
    proc = cli(
        "bench-comm", "--backend", "mpi", "--nproc", "2", "--ops", "all_reduce,all_gather", "--sizes", "1K:8K", "--json"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    sizes = (1024, 2048, 4096, 8192)
    assert [(r["op"], r["bytes"]) for r in rows] == [(op, size) for op in NCCL_TESTS for size in sizes]
    for r in rows:
        assert r["ok"] and r["ranks"] == 2 and r["backend"] == "mpi" and 0 < r["min_us"] <= r["time_us"]
        assert r["algbw"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e-6) / 1e9)
        assert r["busbw"] == pytest.approx(r["algbw"] * NCCL_TESTS[r["op"]](2))
    # the gloo path's rows carry exactly the same fields
    assert set(rows[0]) == {"op", "bytes", "time_us", "min_us", "algbw", "busbw", "ok", "ranks", "backend"}


def test_without_mpi4py_the_mpi_backend_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `import mpi4py` now raises ImportError
    for argv in (["--backend", "mpi"], ["--compare", "gloo,mpi"]):
        assert main(["bench-comm", *argv, "--sizes", "1K"]) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and "missing: mpi4py" in err and "pip install mpich mpi4py" in err


def test_compare_prints_a_column_per_backend_and_their_ratio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # the table's layout, not the measurement (the test above and test_bench_comm.py measure): each
    # backend returns rows whose time is known, mpi's a quarter of gloo's, so its busbw is 4x
    def rows(args: Any, backend: str, ops: list[str], sizes: list[int]) -> tuple[list[dict], float]:
        us = {"gloo": 400.0, "mpi": 100.0}[backend]
        return [
            bench_comm.make_row(op, s, us * 1e-6, us * 1e-6, True, args.nproc, backend) for op in ops for s in sizes
        ], 0.0

    monkeypatch.setattr(bench_comm, "_rows", rows)
    png = tmp_path / "both.png"
    assert main(["bench-comm", "--compare", "gloo,mpi", "--ops", "all_reduce", "--sizes", "4K", "--out", str(png)]) == 0
    head, row = capsys.readouterr().out.splitlines()[1:3]
    assert head.split() == ["op", "bytes", "gloo", "us", "gloo", "busbw", "mpi", "us", "mpi", "busbw", "mpi/gloo", "ok"]
    # all-reduce on 2 ranks: busbw = algbw = 4096 B / time
    assert row.split() == ["all_reduce", "4,096", "400.0", "0.010", "100.0", "0.041", "4.00x", "yes"]
    assert png.stat().st_size > 0
