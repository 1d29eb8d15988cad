"""End to end: benchmarks/gpu_check.sh's dry mode (CPU, tiny model) runs through and reports sane figures."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from meshtrain.config import load_config
from meshtrain.planner.predict import predict_run

pytestmark = pytest.mark.e2e


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(out), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "pure tests" not in text  # the dry mode skips the pytest step
    assert "train compile-none: rc=0" in text, text
    assert (out / "gpu_check.log").read_text() == text  # everything printed is also in $OUT

    tps = float(re.search(r"\[compile-none\] tokens/s median ([\d,]+)", text)[1].replace(",", ""))
    assert tps > 0
    # the median the report prints is the one of the records the trainer wrote after warm-up (3 steps)
    rows = [json.loads(line) for line in (out / "compile-none.metrics.jsonl").read_text().splitlines()]
    assert tps == pytest.approx(statistics.median(r["tokens_per_s"] for r in rows[3:]), rel=1e-3, abs=1)
    assert "[compile-none] MFU peak unknown (cpu)" in text

    # the planner CLI's prediction the report used equals predict_run on the config the run wrote
    cfg = load_config(out / "compile-none.config.toml")
    pred = predict_run(cfg, 1)
    reported = int(re.search(r"\[compile-none\] peak memory .* predicted_bytes=(\d+)", text)[1])
    assert reported == pred["mem_model_state_bytes"] + pred["mem_activation_bytes"] > 0
    measured = float(re.search(r"\[compile-none\] peak memory ([\d.]+) GiB", text)[1])
    assert measured > 0
