"""DiLoCo's exact resume: a crash in the middle of a round, with a mean in flight, loses nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli
from dist_utils import Run, read_metrics, train_runs

pytestmark = pytest.mark.e2e

# 2 islands of 2 ZeRO-3 ranks, streaming (2 fragments, one every 2 steps) and overlapped: the
# checkpoint after step 3 falls between syncs, with the islands apart and fragment 0's mean in flight
RUN = (
    "training.steps=8",
    "checkpoint.interval=3",
    "training.micro_batch=2",
    "parallel.diloco=2",
    "parallel.zero_stage=3",
    "diloco.inner_steps=4",
    "diloco.fragments=2",
    "diloco.overlap=true",
)


def test_islands_resume_bit_identically_mid_round(tmp_path: Path) -> None:
    straight = Run(tmp_path / "straight", 4, list(RUN))
    train_runs([straight])
    args = ["train", "--config", "configs/tiny.toml", "--nproc", "4", "--run-dir", str(tmp_path / "restarted")]
    args += ["--max-restarts", "1"]
    for item in (*RUN, "checkpoint.resume=auto"):
        args += ["--set", item]
    proc = cli(*args, env={"MESHTRAIN_FAULT": "after_step:3", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected fault after_step at step 3" in proc.stderr
    assert "resumed from" in proc.stdout + proc.stderr
    for rank in range(4):  # both islands: each resumes its own weights and the shared outer state
        got, want = read_metrics(tmp_path / "restarted", rank), read_metrics(straight.run_dir, rank)
        assert [r["step"] for r in got] == list(range(1, 9))
        for key in ("loss", "grad_norm", "outer_fragment", "island"):
            assert [r[key] for r in got] == [r[key] for r in want], (rank, key)
    losses = {read_metrics(straight.run_dir, rank)[2]["loss"] for rank in (0, 2)}
    assert len(losses) == 2  # the islands really differ at the checkpoint
