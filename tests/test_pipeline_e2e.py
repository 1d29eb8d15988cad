"""Pipeline parallelism through the CLI: composition with DP, and checkpoints that cross layouts."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from conftest import cli, rel_diff, train

pytestmark = pytest.mark.dist
BASE = ("training.steps=3", "model.n_layers=4", "training.micro_batch=2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return train(tmp_path_factory.mktemp("ref"), 1, *BASE)


@pytest.mark.parametrize("nproc, overrides", [
    (4, ["parallel.pp=2", "parallel.pp_chunks=2", "parallel.pp_schedule=interleaved-1f1b"]),  # pp2 x dp2, v=2
    (4, ["parallel.pp=4", "parallel.pp_schedule=zb-h2"]),
    (2, ["parallel.pp=2", "parallel.pp_schedule=zb-h1", "training.activation_checkpointing=full"]),
])
def test_pipelined_runs_match_single_device(nproc: int, overrides: list[str], reference: list[dict],
                                            tmp_path: Path) -> None:
    got = train(tmp_path, nproc, *BASE, *overrides)
    assert rel_diff([r["loss"] for r in got], [r["loss"] for r in reference]) < 1e-5
    assert rel_diff([r["grad_norm"] for r in got], [r["grad_norm"] for r in reference]) < 1e-5
    # the run left a trace that the schedule tool draws and measures like a simulation
    drawn = cli("schedule", "--trace", str(tmp_path), "--out", str(tmp_path / "trace.png"), timeout=60)
    assert drawn.returncode == 0 and "measured bubble" in drawn.stdout, drawn.stderr
    assert (tmp_path / "trace.png").stat().st_size > 1000


def _resume_from(source: Path, step: int, target: Path) -> None:
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)


def test_checkpoints_cross_between_pipelined_and_plain_runs(tmp_path: Path) -> None:
    run = ("training.steps=6", "checkpoint.interval=3", "model.n_layers=4", "training.micro_batch=2")
    piped = train(tmp_path / "pp", 2, *run, "parallel.pp=2")
    plain = train(tmp_path / "plain", 1, *run)
    assert rel_diff([r["loss"] for r in piped], [r["loss"] for r in plain]) < 1e-5
    _resume_from(tmp_path / "pp", 3, tmp_path / "pp_to_plain")
    _resume_from(tmp_path / "plain", 3, tmp_path / "plain_to_pp")
    a = train(tmp_path / "pp_to_plain", 1, *run, "checkpoint.resume=auto")
    b = train(tmp_path / "plain_to_pp", 2, *run, "parallel.pp=2", "checkpoint.resume=auto")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [4, 5, 6]
    assert rel_diff([r["loss"] for r in a], [r["loss"] for r in plain[3:]]) < 1e-5
    assert rel_diff([r["loss"] for r in b], [r["loss"] for r in plain[3:]]) < 1e-5


def test_training_with_a_custom_schedule_from_csv(reference: list[dict], tmp_path: Path) -> None:
    """A user's schedule: the compute rows of an exported ZB-H1, reordered file-wise, sends inferred."""
    exported = tmp_path / "zb.csv"
    assert cli("schedule", "--pp", "2", "--microbatches", "4", "--schedule", "zb-h1", "--csv-out", str(exported),
               timeout=60).returncode == 0
    rows = [r for r in csv.DictReader(exported.open()) if not r["kind"].startswith(("SEND", "RECV"))]
    custom = tmp_path / "mine.csv"
    with custom.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for rank in ("0", "1"):
            for index, row in enumerate(r for r in rows if r["rank"] == rank):
                writer.writerow({**row, "index": index})
    got = train(tmp_path / "run", 2, *BASE, "parallel.pp=2", f"parallel.pp_schedule={custom}")
    assert rel_diff([r["loss"] for r in got], [r["loss"] for r in reference]) < 1e-5
    wrong = cli("train", "--config", "configs/tiny.toml", "--nproc", "2", "--set", "parallel.pp=2",
                "--set", f"parallel.pp_schedule={custom}", "--set", "training.micro_batch=1", timeout=60)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "microbatches" in wrong.stderr
