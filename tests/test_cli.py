"""End to end: the CLI as a user runs it, including every config error being one clean line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, cli

pytestmark = pytest.mark.e2e


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
