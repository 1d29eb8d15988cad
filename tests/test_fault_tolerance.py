"""Nothing lost and nothing hangs silently, end to end through the CLI with real faults: a rank that
hangs is named by the watchdog, NaN gradients skip a step on every rank alike, too many skips stop
the run, a full disk keeps the previous checkpoint, a corrupt checkpoint is passed over, a
checkpoint of another model is refused by name, a run folder is never silently reused, asynchronous
saves stay atomic, two "nodes" equal one, and SIGKILLed workers resume bit-identically
(benchmarks/chaos.py). Exact resume after an injected crash is in test_resume.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checks import assert_same_training
from conftest import ROOT, TINY, cli, train
from dist_utils import Run, read_metrics, train_runs
from meshtrain.checkpoint_files import latest

pytestmark = pytest.mark.e2e
SHORT = ["training.steps=6", "checkpoint.interval=2", "training.micro_batch=2", "checkpoint.keep=3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """One finished 2-rank run with checkpoints at steps 2, 4 and 6, copied by the tests that need one."""
    run_dir = tmp_path_factory.mktemp("base")
    return run_dir, train(run_dir, 2, *SHORT)


def _copy(base: tuple[Path, list[dict]], to: Path) -> Path:
    shutil.copytree(base[0], to)
    return to


def _train_args(run_dir: Path, nproc: int, *overrides: str) -> list[str]:
    args = ["train", "--config", str(TINY), "--nproc", str(nproc), "--run-dir", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    return args


def _watch(args: list[str], env: dict[str, str], marks: tuple[str, ...], timeout: float) -> tuple[int, str, dict]:
    """Run the CLI, noting when each mark first appears in its output."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshtrain", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env},
    )
    seen: dict[str, float] = {}
    lines = []
    start = time.monotonic()
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        for mark in marks:
            if mark in line and mark not in seen:
                seen[mark] = time.monotonic()
        if time.monotonic() - start > timeout:
            proc.kill()
            break
    return proc.wait(), "".join(lines), seen


def test_the_watchdog_names_the_hung_rank_and_the_collective(tmp_path: Path) -> None:
    timeout = 3.0
    args = _train_args(
        tmp_path, 2, "training.steps=8", "resilience.collective_timeout_s=3", "resilience.heartbeat_s=0.5"
    )
    code, _, seen = _watch(
        args, {"MESHTRAIN_FAULT": "sleep:3@1"}, ("injected fault sleep", "meshtrain watchdog:"), timeout=120
    )
    assert code != 0
    latency = seen["meshtrain watchdog:"] - seen["injected fault sleep"]
    assert timeout <= latency <= timeout + 15, latency
    report = (tmp_path / "hang_report.txt").read_text()
    lines = report.splitlines()
    assert lines[0].startswith("meshtrain watchdog: rank 0 has waited") and "all_reduce" in lines[0]
    assert lines[1].startswith("behind: rank 1") and "is in no collective" in lines[1]
    assert "--- rank 1 ---" in report and "maybe_fail" in report.split("--- rank 1 ---")[1]  # its stack: the sleep
    print(f"watchdog detection latency {latency:.1f} s with collective_timeout_s={timeout}")


def test_normal_runs_never_report_and_record_step_times(tmp_path: Path) -> None:
    code, out, _ = _watch(
        _train_args(tmp_path, 2, "training.steps=6", "resilience.collective_timeout_s=2", "resilience.heartbeat_s=0.2"),
        {},
        (),
        timeout=120,
    )
    assert code == 0 and "watchdog" not in out and not (tmp_path / "hang_report.txt").exists()
    for rank in (0, 1):
        for r in read_metrics(tmp_path, rank):
            assert 0 < r["step_time_min_s"] <= r["step_time_median_s"] <= r["step_time_max_s"]
            assert r["skipped"] is False and r["skipped_steps"] == 0


def test_nan_gradients_skip_the_step_on_every_rank_alike(tmp_path: Path) -> None:
    """A NaN on one rank reaches every rank through the reduction; all skip step 3 and train on,
    exactly as one process does with the same fault."""
    fault = {"MESHTRAIN_FAULT": "nan_grad:3"}
    runs = [
        Run(tmp_path / "single", 1, ["training.steps=6", "training.micro_batch=8"], env=fault),
        Run(
            tmp_path / "dp2", 2, ["training.steps=6", "training.micro_batch=4"], env={"MESHTRAIN_FAULT": "nan_grad:3@1"}
        ),
        Run(tmp_path / "clean", 1, ["training.steps=6", "training.micro_batch=8"]),
    ]
    single, dp2, clean = train_runs(runs)
    for rank in (0, 1):
        recs = read_metrics(runs[1].run_dir, rank)
        assert [r["skipped"] for r in recs] == [False, False, True, False, False, False]
        assert recs[-1]["skipped_steps"] == 1
    assert_same_training([r for r in dp2 if r["step"] != 3], [r for r in single if r["step"] != 3], 1e-6, 1e-5)
    assert dp2[2]["loss"] == pytest.approx(clean[2]["loss"], rel=1e-6)  # the loss was fine; its gradient was not
    assert dp2[3]["loss"] != pytest.approx(clean[3]["loss"], rel=1e-6)  # step 3's update really did not happen


def test_too_many_skipped_steps_stop_the_run_and_keep_the_checkpoints(tmp_path: Path) -> None:
    proc = cli(
        *_train_args(tmp_path, 2, *SHORT, "resilience.max_skipped_steps=0"), env={"MESHTRAIN_FAULT": "nan_grad:3"}
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "consecutive steps skipped" in line]
    assert len(errors) == 1 and errors[0].startswith("error: 1 consecutive steps skipped (steps 3-3")
    assert latest(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step_00000002"


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    proc = cli(*_train_args(tmp_path, 2, *SHORT), env={"MESHTRAIN_FAULT": "enospc_in_save:4"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error: saving the checkpoint")}
    assert len(errors) == 1
    (error,) = errors
    assert "no space left on the device" in error and "the previous checkpoint step_00000002 is intact" in error
    assert latest(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step_00000002"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]  # no torn .tmp left


def test_a_corrupt_checkpoint_is_passed_over_with_a_warning(base: tuple, tmp_path: Path) -> None:
    run_dir = _copy(base, tmp_path / "run")
    shard = next((run_dir / "checkpoints" / "step_00000006").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated, as by a dying disk
    proc = cli(*_train_args(run_dir, 2, *SHORT, "training.steps=8"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "step_00000006 is unusable" in out and "resumed from" in out and "step_00000004" in out
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))


def test_a_checkpoint_of_another_model_is_refused_by_name(base: tuple, tmp_path: Path) -> None:
    run_dir = _copy(base, tmp_path / "run")
    proc = cli(*_train_args(run_dir, 2, *SHORT, "training.steps=8", "model.dim=32"), "--resume")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (
        "error: model.model.embed_tokens.weight is [256, 64] in checkpoint step_00000006 but [256, 32]" in proc.stderr
    )


def test_a_folder_holding_a_run_is_refused_then_set_aside_on_request(base: tuple, tmp_path: Path) -> None:
    run_dir = _copy(base, tmp_path / "run")
    before = (run_dir / "metrics.jsonl").read_text()
    again = cli(*_train_args(run_dir, 2, *SHORT, "checkpoint.resume=never"))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing touched
    fresh = cli(*_train_args(run_dir, 2, *SHORT), "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    (moved,) = run_dir.glob("replaced-*")
    assert (moved / "metrics.jsonl").read_text() == before and (moved / "checkpoints" / "step_00000006").is_dir()
    assert [r["loss"] for r in read_metrics(run_dir)] == [r["loss"] for r in base[1]]


def test_generate_rebuilds_the_model_from_the_checkpoints_own_config(base: tuple, tmp_path: Path) -> None:
    run_dir = _copy(base, tmp_path / "run")
    (run_dir / "config.toml").write_text("[model]\ndim = 32\nn_heads = 2\n")  # a later run's config, say
    out = cli("generate", "--run-dir", str(run_dir), "--prompt", "ab", "--max-new-tokens", "5")
    assert out.returncode == 0 and "step 6" in out.stderr, out.stderr


def test_asynchronous_saves_stay_atomic_and_resume_exactly(base: tuple, tmp_path: Path) -> None:
    """The step-4 save is still being written when the ranks die: resume takes step 2, the last committed,
    and the run ends bit-identical to the synchronous one."""
    proc = cli(
        *_train_args(tmp_path, 2, *SHORT, "checkpoint.async_save=true"),
        "--max-restarts",
        "1",
        "--resume",
        env={"MESHTRAIN_FAULT": "after_step:4"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout + proc.stderr and "step_00000002" in proc.stdout + proc.stderr
    assert [(r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path)] == [
        (r["loss"], r["grad_norm"]) for r in base[1]
    ]
    assert len((tmp_path / "saves.jsonl").read_text().splitlines()) == 4  # steps 2 and 4, then 4 and 6 again


def test_two_nodes_train_like_one(base: tuple, tmp_path: Path) -> None:
    """2 launchers x 2 ranks on localhost (each its own --node-rank) against one node's 2 ranks."""
    port = 29400 + os.getpid() % 500
    node = [*_train_args(tmp_path, 2, *SHORT), "--nnodes", "2", "--master-port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    second = subprocess.Popen(
        [sys.executable, "-m", "meshtrain", *node, "--node-rank", "1"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first = cli(*node, "--node-rank", "0")
    out, _ = second.communicate(timeout=240)
    assert first.returncode == 0 and second.returncode == 0, (first.stderr[-2000:], out[-2000:])
    assert_same_training(read_metrics(tmp_path), base[1], loss=1e-6, grad_norm=1e-5)
    assert sorted(p.name for p in tmp_path.glob("metrics.rank*.jsonl")) == [f"metrics.rank{r}.jsonl" for r in range(4)]


def test_sigkilled_workers_resume_bit_identically() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "chaos.py"),
            "--trials",
            "1",
            "--layouts",
            "pp",
            "--seed",
            "1",
            "--steps",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0 and "pp: 1/1 identical" in proc.stdout, proc.stdout + proc.stderr[-2000:]
