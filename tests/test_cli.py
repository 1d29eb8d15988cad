"""End to end: the CLI as a user runs it, including every config error being one clean line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, cli, train

pytestmark = pytest.mark.e2e
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_model_state_bytes", "peak_rss_bytes"}


def test_train_30_steps_loss_falls_then_generate(tmp_path: Path) -> None:
    recs = train(tmp_path, 2, "training.steps=30", "checkpoint.interval=15")
    assert len(recs) == 30 and set(recs[0]) >= METRIC_KEYS
    first, last = sum(r["loss"] for r in recs[:5]) / 5, sum(r["loss"] for r in recs[-5:]) / 5
    assert last < first - 0.2
    assert (tmp_path / "config.toml").read_text().count("dp_shard = 2") == 1
    out = cli("generate", "--run-dir", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "10")
    assert out.returncode == 0, out.stderr
    assert "step 30" in out.stderr and len(out.stdout.strip()) > 0


@pytest.mark.parametrize("command", [[], ["train"], ["generate"], ["config-help"]])
def test_help_explains_itself(command: list[str]) -> None:
    proc = cli(*command, "--help", timeout=60)
    assert proc.returncode == 0 and "usage: meshtrain" in proc.stdout


def test_external_torchrun_launch(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "meshtrain.train",
            "--config",
            str(TINY),
            "--run-dir",
            str(tmp_path),
            "--set",
            "training.steps=3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
