"""Checkpoints: exact resume after an elastic restart, and crash safety during a save."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli
from dist_utils import Run, read_metrics, train_runs
from meshtrain.checkpoint import latest

pytestmark = pytest.mark.e2e
RUN = ("training.steps=12", "checkpoint.interval=6", "training.micro_batch=2")


ZERO3 = ("parallel.zero_stage=3", "model.dim=42", "model.n_heads=3", "model.n_kv_heads=1", "model.n_layers=4")


def test_zero3_restart_resumes_bit_identically(tmp_path: Path) -> None:
    """ZeRO-3's sharded parameters and optimizer state survive an elastic restart exactly. (Plain
    DP's restart is test_fault_tolerance.py's asynchronous-save test, and a pipeline's the SIGKILL test.)"""
    extra = ZERO3
    # the uninterrupted twin needs no launcher: the in-process pool trains it on the same 2 ranks
    straight = train_runs([Run(tmp_path / "straight", 2, [*RUN, *extra])])[0]
    # The first attempt dies right after step 6 (checkpointed); the elastic agent restarts the
    # workers, which resume from that checkpoint and finish.
    args = [
        "train",
        "--config",
        "configs/tiny.toml",
        "--nproc",
        "2",
        "--run-dir",
        str(tmp_path / "restarted"),
        "--max-restarts",
        "1",
    ]
    for item in (*RUN, *extra, "checkpoint.resume=auto"):
        args += ["--set", item]
    # one thread per rank, as the pool runs its twin, so the two are comparable bit for bit
    proc = cli(*args, env={"MESHTRAIN_FAULT": "after_step:6", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected fault after_step at step 6" in proc.stderr
    assert "resumed from" in proc.stdout + proc.stderr
    resumed = read_metrics(tmp_path / "restarted")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.toml", "--nproc", "2", "--run-dir", str(run)]
    for item in RUN:
        args += ["--set", item]
    proc = cli(*args, env={"MESHTRAIN_FAULT": "in_save:12"})
    assert proc.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "step_00000012.tmp").is_dir()  # the torn save is there, but invisible
    assert latest(ckpts) == ckpts / "step_00000006"
    again = cli(*args, "--set", "checkpoint.resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert latest(ckpts) == ckpts / "step_00000012"
    assert not (ckpts / "step_00000012.tmp").exists()
