"""Shared fixtures: every test gets its own temp folders for torch's caches, and helpers to run the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
# Test this tree's sources, even where another checkout is installed in editable mode.
sys.path.insert(0, str(ROOT / "src"))


@pytest.fixture(autouse=True)
def _isolated_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var, sub in (("TMPDIR", "tmp"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TORCH_EXTENSIONS_DIR", "ext")):
        (tmp_path / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / sub))


def cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m meshtrain ARGS` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "meshtrain", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)


def train(run_dir: Path, nproc: int, *overrides: str, env: dict[str, str] | None = None,
          config: Path = TINY) -> list[dict]:
    """Train tiny.toml with overrides on nproc ranks; return metrics.jsonl's records."""
    args = ["train", "--config", str(config), "--nproc", str(nproc), "--run-dir", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    proc = cli(*args, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return read_metrics(run_dir)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def rel_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
