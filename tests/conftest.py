"""Shared fixtures: every test gets its own temp folders for torch's caches, and helpers to run the CLI.

Every test carries exactly one cost tier, checked at collection: pure (no processes), dist (real
gloo processes) or e2e (the meshtrain CLI end to end). `make test-fast` runs the pure tier.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dist_utils import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
# Test this tree's sources, even where another checkout is installed in editable mode; the
# environment too, for dist_utils' forkserver: it imports meshtrain before it takes our sys.path.
sys.path.insert(0, str(ROOT / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])


TIERS = ("pure", "dist", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    untiered = [item.nodeid for item in items if sum(item.get_closest_marker(t) is not None for t in TIERS) != 1]
    if untiered:
        raise pytest.UsageError(f"tests without exactly one tier marker ({', '.join(TIERS)}): {untiered[:5]}")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For a module of tiny models or matrices (`pytest.mark.usefixtures("one_thread")`): one torch
    thread runs them faster, since a pool's hand-offs cost more than the arithmetic, far more on a
    busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var, sub in (
        ("TMPDIR", "tmp"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("TORCH_EXTENSIONS_DIR", "ext"),
        ("MPLCONFIGDIR", "mpl"),
    ):
        (tmp_path / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / sub))


def config_error(world: int, *overrides: str) -> str:
    """The one-line ConfigError that validating these overrides (on the defaults) for `world` ranks raises."""
    from meshtrain.config import ConfigError, load_config
    from meshtrain.validate import validate

    with pytest.raises(ConfigError) as info:
        validate(load_config(None, list(overrides)), world)
    message = str(info.value)
    assert "\n" not in message
    return message


def cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m meshtrain ARGS` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
    )


def train(
    run_dir: Path, nproc: int, *overrides: str, env: dict[str, str] | None = None, config: Path = TINY
) -> list[dict]:
    """Train tiny.toml with overrides on nproc ranks; return metrics.jsonl's records."""
    args = ["train", "--config", str(config), "--nproc", str(nproc), "--run-dir", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    proc = cli(*args, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return read_metrics(run_dir)
