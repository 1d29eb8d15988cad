"""The on-disk rules of checkpoints and run folders, on hand-made folders (no processes): what
counts as a checkpoint, rotation that only ever removes this run's older ones, atomic re-saves,
verification, metrics that drop the records a resume replays, and the run-folder refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from meshtrain import checkpoint_files as ckpt
from meshtrain.config import ConfigError
from meshtrain.metrics import MetricsWriter
from meshtrain.rundir import check_run_dir, describe_run, set_aside

pytestmark = pytest.mark.pure


def make(root: Path, step: int, run_id: str = "run-a", suffix: str = "", commit: bool = True) -> Path:
    path = root / f"step_{step:08d}{suffix}"
    path.mkdir(parents=True)
    (path / "data.distcp").write_bytes(os.urandom(64))
    (path / "meta.json").write_text(json.dumps({"step": step, "run_id": run_id}))
    if commit:
        ckpt._commit(path, {"step": step, "run_id": run_id}, "[model]\n")
    return path


def test_only_committed_folders_are_checkpoints(tmp_path: Path) -> None:
    make(tmp_path, 10)
    make(tmp_path, 20, commit=False)  # a higher step without its commit marker: torn, or another tool's
    make(tmp_path, 30, suffix=".tmp", commit=False)
    assert [p.name for p in ckpt.candidates(tmp_path)] == ["step_00000010"]
    assert ckpt.latest(tmp_path) == tmp_path / "step_00000010"


def test_rotation_keeps_this_runs_newest_and_never_another_runs(tmp_path: Path) -> None:
    for step in (400, 500):
        make(tmp_path, step, run_id="earlier")
    for step in (100, 200, 300):
        make(tmp_path, step, run_id="now")
    removed = ckpt.prune(tmp_path, "now", keep=2)
    assert [p.name for p in removed] == ["step_00000100"]
    assert sorted(p.name for p in ckpt.candidates(tmp_path)) == [
        "step_00000200",
        "step_00000300",
        "step_00000400",
        "step_00000500",
    ]
    assert ckpt.prune(tmp_path, "now", keep=0) == [tmp_path / "step_00000200"]  # keep=0 still keeps the newest


def test_uncommitted_final_folders_are_left_alone_by_cleanup(tmp_path: Path) -> None:
    make(tmp_path, 10)
    old_format = make(tmp_path, 5, commit=False)  # e.g. from an older meshtrain: never deleted
    torn = make(tmp_path, 20, suffix=".tmp", commit=False)
    superseded = make(tmp_path, 10, suffix=".old")
    ckpt._clear_stale(tmp_path)
    assert old_format.exists() and not torn.exists() and not superseded.exists()


def test_a_resave_is_atomic_at_every_instant(tmp_path: Path) -> None:
    """Between the two renames of a re-save, the committed .old copy is what latest() finds."""
    make(tmp_path, 10)
    new = make(tmp_path, 10, suffix=".tmp")
    final = tmp_path / "step_00000010"
    final.rename(tmp_path / "step_00000010.old")  # a crash right here: no final folder
    assert ckpt.latest(tmp_path) is not None and ckpt.verify(ckpt.latest(tmp_path)) is None
    ckpt._publish(new, final)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000010"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_verification_finds_damage_and_latest_falls_back(damage: str, tmp_path: Path) -> None:
    make(tmp_path, 10)
    bad = make(tmp_path, 20)
    target = bad / "data.distcp"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[0] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    assert ckpt.verify(bad) is not None
    warnings: list[str] = []
    assert ckpt.latest(tmp_path, warn=warnings.append) == tmp_path / "step_00000010"
    assert len(warnings) == 1 and "step_00000020" in warnings[0]


def test_metrics_drop_the_records_a_resume_replays(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 16)) + '{"step": 16, "lo')
    writer = MetricsWriter([path], keep_through=10)  # resumed from step 10: 11..15 and the torn line go
    writer.write({"step": 11, "loss": 2.0})
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [*range(1, 12)]
    MetricsWriter([path], keep_through=0)
    assert path.read_text() == ""


def _run(run_dir: Path, steps: int = 3, checkpoint: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, steps + 1)))
    if checkpoint:
        make(run_dir / "checkpoints", steps)


def test_a_folder_with_a_run_is_refused_unless_told(tmp_path: Path) -> None:
    run = tmp_path / "run"
    check_run_dir(run, "never", overwrite=False)  # nothing there yet
    _run(run)
    assert describe_run(run) == "metrics.jsonl up to step 3, checkpoints up to step_00000003"
    with pytest.raises(ConfigError, match="--resume to continue it, --overwrite"):
        check_run_dir(run, "never", overwrite=False)
    check_run_dir(run, "auto", overwrite=False)  # continues that run
    check_run_dir(run, "never", overwrite=True)
    other = tmp_path / "no-checkpoint"
    _run(other, checkpoint=False)
    with pytest.raises(ConfigError, match="there is no checkpoint to resume it from"):
        check_run_dir(other, "auto", overwrite=False)


def test_overwrite_moves_the_old_run_aside(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run)
    (run / "metrics.rank1.jsonl").write_text("{}\n")
    moved = set_aside(run)
    assert moved is not None and moved.parent == run
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoints", "metrics.jsonl", "metrics.rank1.jsonl"]
    assert describe_run(run) is None and [p for p in run.iterdir()] == [moved]


def test_unwritable_and_file_run_dirs_are_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_run_dir(a_file, "auto", overwrite=False)
    with pytest.raises(ConfigError, match="cannot be written"):  # under a file: no folder can be made there
        check_run_dir(a_file / "run", "auto", overwrite=False)
