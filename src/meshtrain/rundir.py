"""The run folder: what counts as a run already there, and the explicit choices about it.

A folder holds a run when it has training records (metrics.jsonl with at least one step) or a
committed checkpoint. Starting into such a folder is allowed only when the run continues
(checkpoint.resume = auto with a checkpoint to resume from), or when the user says so: `--overwrite`
moves the previous run's files aside into RUN_DIR/replaced-<time>/ (nothing is deleted). Otherwise
the launcher refuses with one line, before anything is written or spawned.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from meshtrain import checkpoint_files as ckpt
from meshtrain.config import ConfigError

RUN_FILES = ("metrics.jsonl", "config.toml", "checkpoints", "pp_trace", "hang_report.txt", "saves.jsonl")


def recorded_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = 0
    for line in path.read_text().splitlines():
        try:
            steps = max(steps, int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return steps


def describe_run(run_dir: Path) -> str | None:
    """What run the folder holds, in words; None when it holds none."""
    steps = recorded_steps(run_dir)
    saved = ckpt.candidates(run_dir / "checkpoints")
    if not steps and not saved:
        return None
    parts = [f"metrics.jsonl up to step {steps}"] if steps else []
    if saved:
        parts.append(f"checkpoints up to {saved[0].name}")
    return ", ".join(parts)


def check_writable(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"logging.run_dir={str(run_dir)!r} is a file, not a folder; pass another --run-dir")
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"logging.run_dir={str(run_dir)!r} cannot be written ({probe} is not a writable folder); "
            "pass another --run-dir"
        )


def check_run_dir(run_dir: Path, resume: str, overwrite: bool) -> None:
    """One-line ConfigError unless starting a run in `run_dir` loses nothing."""
    check_writable(run_dir)
    held = describe_run(run_dir)
    if held is None or overwrite:
        return
    if resume == "auto" and ckpt.candidates(run_dir / "checkpoints"):
        return  # it continues that run
    why = "checkpoint.resume=never" if resume == "never" else "there is no checkpoint to resume it from"
    raise ConfigError(
        f"{run_dir} already holds a run ({held}) and {why}; pass --resume to continue it, "
        f"--overwrite to start afresh (the old run is moved to {run_dir}/replaced-<time>/), "
        "or another --run-dir"
    )


def set_aside(run_dir: Path) -> Path | None:
    """Move the previous run's files into RUN_DIR/replaced-<time>/; return that folder (None: nothing to move)."""
    present = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    present += sorted(run_dir.glob("metrics.rank*.jsonl"))
    if not present:
        return None
    target = run_dir / time.strftime("replaced-%Y%m%d-%H%M%S")
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('+')[0]}+{suffix}")
    target.mkdir()
    for path in present:
        path.rename(target / path.name)
    return target
