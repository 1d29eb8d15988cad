"""The on-disk format of checkpoints, without torch: names, the commit manifest, verification,
publishing, rotation. The launcher reads it before any worker starts (meshtrain.rundir); the
collective saving and loading are in meshtrain.checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

PREFIX = "step_"
COMMITTED = "COMMITTED"
NAME = re.compile(r"^step_(\d{8})(?:\.(tmp|old))?$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message is one line."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def _step_of(path: Path) -> int | None:
    match = NAME.match(path.name)
    return int(match.group(1)) if match else None


def committed(path: Path) -> dict[str, Any] | None:
    """The manifest of a committed checkpoint folder, or None."""
    try:
        return json.loads((path / COMMITTED).read_text())
    except (OSError, ValueError):
        return None


def candidates(root: Path) -> list[Path]:
    """Committed checkpoints, newest step first (a step's final folder before its .tmp or .old copy)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None and committed(p) is not None]
    return sorted(found, key=lambda p: (-(_step_of(p) or 0), p.name != f"{PREFIX}{_step_of(p):08d}"))


def _crc(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify(path: Path) -> str | None:
    """None if every file the manifest names is there with its size and crc32; else what is wrong."""
    manifest = committed(path)
    if manifest is None:
        return "no commit marker"
    for name, (size, crc) in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest {size}"
        if _crc(f) != crc:
            return f"{name} fails its checksum"
    return None


def latest(root: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest committed checkpoint whose files check out; corrupt ones are reported and skipped."""
    for path in candidates(root):
        problem = verify(path)
        if problem is None:
            return path
        if warn is not None:
            warn(f"checkpoint {path} is unusable ({problem}); falling back to the previous one")
    return None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, meta: dict[str, Any], config_toml: str) -> None:
    """Rank 0: meta and config, fsync of everything, then the manifest, written last and fsynced."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    (tmp / "config.toml").write_text(config_toml)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for f in files:
        _fsync(f)
    manifest = {
        "files": {str(f.relative_to(tmp)): [f.stat().st_size, _crc(f)] for f in files},
        "step": meta["step"],
        "run_id": meta["run_id"],
    }
    (tmp / COMMITTED).write_text(json.dumps(manifest))
    _fsync(tmp / COMMITTED)
    _fsync(tmp)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the committed tmp folder into place; an existing copy goes aside first, then away."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    _fsync(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _clear_stale(root: Path) -> None:
    """Copies no save will finish or need: an uncommitted .tmp (a torn save), and the .tmp or .old copy
    of a step whose final folder is committed. A final-named folder is never removed here."""
    for p in root.iterdir():
        step = _step_of(p)
        if step is None or not p.is_dir() or p.name == step_dir(root, step).name:
            continue
        torn = p.name.endswith(".tmp") and committed(p) is None
        if torn or committed(step_dir(root, step)) is not None:
            shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, run_id: str, keep: int) -> list[Path]:
    """Remove this run's committed checkpoints beyond the `keep` newest; never another run's, never the newest."""
    mine = [
        p
        for p in candidates(root)
        if p == step_dir(root, _step_of(p) or 0) and (committed(p) or {}).get("run_id") == run_id
    ]
    doomed = mine[max(keep, 1) :]
    for p in doomed:
        shutil.rmtree(p)
    return doomed
