"""The architecture's rules, checked on the source so that they stay true.

- Strategies (one package per parallelism) import neutral modules only: never each other, never the
  build path, the trainer, the planner or the tools.
- The training path (trainer, build path, core, strategies) never imports the planner or the tools.
- The trainer knows no strategy by name: the build path hands it an engine and a step runner.
- Nothing replaces a `forward` method or a class's attribute on the model from outside.
- A strategy's runtime code fits in four files beside its __init__.py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure
SRC = Path(__file__).resolve().parents[1] / "src" / "meshtrain"
STRATEGIES = (
    "data_parallel",
    "zero",
    "tensor_parallel",
    "pipeline",
    "context_parallel",
    "expert_parallel",
    "compression",
    "diloco",
)
NOT_FOR_STRATEGIES = ("build", "trainer", "train", "cli", "launch", "generate", "planner", "tools", "validate")
TRAINING = (
    "trainer.py",
    "train.py",
    "build.py",
    "core",
    "activation_checkpoint.py",
    "checkpoint.py",
    "checkpoint_files.py",
    "optim.py",
    "metrics.py",
    "model",
    "data",
    "watchdog.py",
    "resilience.py",
    "preflight.py",
    "rundir.py",
    *STRATEGIES,
)


def _modules(path: Path) -> list[Path]:
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def imported(path: Path) -> set[str]:
    """Every meshtrain module a file imports, at any depth of the file (lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m == "meshtrain" or m.startswith("meshtrain.")}


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def present_strategies() -> list[str]:
    return [s for s in STRATEGIES if (SRC / s).is_dir()]


def test_the_strategy_packages_exist() -> None:
    assert {"data_parallel", "zero", "tensor_parallel", "pipeline"} <= set(present_strategies())


@pytest.mark.parametrize("strategy", present_strategies())
def test_strategies_import_only_neutral_modules(strategy: str) -> None:
    bad = []
    for path in _modules(SRC / strategy):
        for module in imported(path):
            top = _top(module)
            if (top in STRATEGIES and top != strategy) or top in NOT_FOR_STRATEGIES:
                bad.append(f"{path.relative_to(SRC)} imports {module}")
    assert not bad, bad


def test_training_never_imports_the_planner_or_the_tools() -> None:
    bad = [
        f"{path.relative_to(SRC)} imports {module}"
        for entry in TRAINING
        if (SRC / entry).exists()
        for path in _modules(SRC / entry)
        for module in imported(path)
        if _top(module) in ("planner", "tools")
    ]
    assert not bad, bad


def test_the_core_knows_no_strategy() -> None:
    bad = [
        f"{path.relative_to(SRC)} imports {module}"
        for path in _modules(SRC / "core")
        for module in imported(path)
        if _top(module) in STRATEGIES + NOT_FOR_STRATEGIES
    ]
    assert not bad, bad


def test_the_trainer_has_no_strategy_branches() -> None:
    source = (SRC / "trainer.py").read_text()
    assert not {_top(m) for m in imported(SRC / "trainer.py")} & set(STRATEGIES)
    words = re.findall(
        r"pipeline|\bpp\b|\btp\b|\bcp\b|\bep\b|zero_stage|ZeRO|Zero\d|tensor_parallel|sequence_parallel"
        r"|\bstages?\b",
        source,
    )
    assert not words, words


def test_nothing_replaces_methods_from_outside() -> None:
    # `x.forward = ...` and types.MethodType are how a model gets monkeypatched; class swaps too.
    pattern = re.compile(r"\.forward\s*=[^=]|MethodType|\.__class__\s*=[^=]")
    bad = [
        f"{path.relative_to(SRC)}:{n}"
        for path in _modules(SRC)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, bad


@pytest.mark.parametrize("strategy", present_strategies())
def test_a_strategy_fits_in_four_files(strategy: str) -> None:
    files = [p.name for p in (SRC / strategy).glob("*.py") if p.name != "__init__.py"]
    assert len(files) <= 4, files
    assert not [p for p in (SRC / strategy).iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_no_assert_statements_in_src() -> None:
    # asserts vanish under python -O: user input needs a real error, and invariants a clear one
    bad = [
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in _modules(SRC)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert not bad, bad


def test_package_docstrings_name_their_modules() -> None:
    """Each strategy and core package's docstring names every module in it (so it stays a true map)."""
    for package in (*present_strategies(), "core", "tools", "model", "data", "hf"):
        doc = ast.get_docstring(ast.parse((SRC / package / "__init__.py").read_text())) or ""
        missing = [p.stem for p in (SRC / package).glob("*.py") if p.name != "__init__.py" and p.stem not in doc]
        assert not missing, (package, missing)
