"""End to end: `meshtrain prepare-data` (a fresh interpreter, two worker processes), then 2-rank gloo
training on data.source=tokens, resumed exactly from a checkpoint mid-way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli
from dist_utils import Run, read_metrics, train_runs

pytestmark = pytest.mark.e2e


def test_prepare_data_then_train_on_the_shards_and_resume_exactly(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 4)}) for i in range(300)]
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "data"
    args = ["prepare-data", "--input", str(corpus), "--out", str(out), "--workers", "2", "--shard-tokens", "8000"]
    proc = cli(*args, "--val-fraction", "0.05")
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == 15 and len(meta["splits"]["train"]["shards"]) > 1
    # constant lr after the warmup: a 2-step run is the first two steps of the 4-step one. The resumed
    # run has no warmup, so only a real resume (steps 1-2 from the checkpoint) matches the straight run.
    base = ["data.source=tokens", f"data.path={out}", "training.lr_schedule=constant", "checkpoint.interval=2"]
    straight, half = tmp_path / "straight", tmp_path / "resumed"
    records = train_runs(
        [
            Run(straight, 2, [*base, "training.steps=4", "checkpoint.interval=0"]),
            Run(half, 2, [*base, "training.steps=2"]),
            Run(half, 2, [*base, "training.steps=4", "training.warmup_steps=0", "checkpoint.resume=auto"]),
        ]
    )
    assert [r["step"] for r in records[0]] == [1, 2, 3, 4]
    resumed = read_metrics(half)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in records[0]]
