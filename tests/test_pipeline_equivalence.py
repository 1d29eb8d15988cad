"""Pipelined layouts train to the single-device losses: every schedule (terapipe's token slices too),
with DP, TP (+ SP) and recomputation, a custom CSV schedule; every rank (every stage) sends and holds what the planner
predicts; traces that the schedule tool reads; checkpoints that cross between pipelined and plain runs.

The runs train in one pool of real gloo ranks (tests/dist_utils.py). Layer-level checks of each
schedule (every gradient) are in test_pipeline_gloo.py; ZeRO under pipelining in test_zero_equivalence.py.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from checks import TRAFFIC, assert_counters_honest, assert_planner_agrees, assert_same_training
from conftest import cli
from dist_utils import Run, read_metrics, train_named, train_runs

pytestmark = pytest.mark.dist
BASE = ["training.steps=3", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "training.micro_batch=2"]
PP_TP = ["parallel.pp=2", "parallel.tp=2"]
SP = "parallel.sequence_parallel=true"
LAYOUTS = {  # name: (nproc, overrides)
    "pp2-1f1b": (2, ["parallel.pp=2"]),
    "pp2-gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "pp2-zb-h1-recompute": (
        2,
        ["parallel.pp=2", "parallel.pp_schedule=zb-h1", "training.activation_checkpointing=full"],
    ),
    "pp4-zb-h2": (4, ["parallel.pp=4", "parallel.pp_schedule=zb-h2"]),
    "pp2v2-dp2-interleaved": (4, ["parallel.pp=2", "parallel.pp_chunks=2", "parallel.pp_schedule=interleaved-1f1b"]),
    "pp2-uneven-split": (2, ["parallel.pp=2", "parallel.pp_split=3,1"]),
    "pp2-tp2-1f1b": (4, [*PP_TP, "parallel.pp_schedule=1f1b", "checkpoint.interval=2"]),
    "pp2-tp2-sp-interleaved": (4, [*PP_TP, SP, "parallel.pp_chunks=2", "parallel.pp_schedule=interleaved-1f1b"]),
    "pp2-dp2-tp2-sp-zb": (8, [*PP_TP, SP, "parallel.pp_schedule=zb-h1", "checkpoint.interval=2"]),  # 3-D mesh, B/W
    "pp2-zb-v": (2, ["parallel.pp=2", "parallel.pp_chunks=2", "parallel.pp_schedule=zb-v"]),  # the V: 4 stages
    "pp2-dp2-terapipe": (4, ["parallel.pp=2", "parallel.pp_schedule=terapipe", "parallel.pp_slices=4"]),  # token slices
}
ZB_V = ["parallel.pp_chunks=2", "parallel.pp_schedule=zb-v", "training.global_batch=16", "model.n_layers=8"]
"""pp4 ZB-V: 8 stages (one block each) and 8 >= 2p-1 microbatches, against its own 8-block single run."""


def _custom_schedule(tmp: Path) -> Path:
    """A user's schedule: the compute rows of an exported ZB-H1, reordered file-wise, sends left to infer."""
    exported = tmp / "zb.csv"
    assert (
        cli(
            "schedule",
            "--pp",
            "2",
            "--microbatches",
            "4",
            "--schedule",
            "zb-h1",
            "--csv-out",
            str(exported),
            timeout=60,
        ).returncode
        == 0
    )
    rows = [r for r in csv.DictReader(exported.open()) if not r["kind"].startswith(("SEND", "RECV"))]
    custom = tmp / "mine.csv"
    with custom.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for rank in ("0", "1"):
            for index, row in enumerate(r for r in rows if r["rank"] == rank):
                writer.writerow({**row, "index": index})
    return custom


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, list[dict]]]:
    root = tmp_path_factory.mktemp("pp")
    specs = {"single": Run(root / "single", 1, [*BASE, "checkpoint.interval=2"])}
    specs.update({name: Run(root / name, nproc, [*BASE, *o]) for name, (nproc, o) in LAYOUTS.items()})
    custom = _custom_schedule(root)
    specs["pp2-custom-csv"] = Run(root / "custom", 2, [*BASE, "parallel.pp=2", f"parallel.pp_schedule={custom}"])
    specs["single-8"] = Run(root / "single-8", 1, [*BASE, *ZB_V[2:]])
    specs["pp4-zb-v"] = Run(root / "pp4-zb-v", 4, [*BASE, "parallel.pp=4", *ZB_V])
    return train_named(specs)


ALL = [*LAYOUTS, "pp2-custom-csv"]
REFERENCE = {"pp4-zb-v": "single-8"}  # runs compared with another single-device run than "single"
CHECKPOINTED = {"pp2-tp2-1f1b", "pp2-dp2-tp2-sp-zb"}  # checkpoint gathers are not step traffic


@pytest.mark.parametrize("layout", [*ALL, *REFERENCE])
def test_pipelined_layout_matches_single_device(layout: str, runs: dict) -> None:
    assert_same_training(runs[layout][1], runs[REFERENCE.get(layout, "single")][1], loss=1e-5, grad_norm=1e-5)


@pytest.mark.parametrize("layout", [*ALL, *REFERENCE])
def test_every_stage_sends_and_holds_what_the_planner_predicts(layout: str, runs: dict) -> None:
    """Stage by stage (the first holds the embedding, the last the head; p2p bytes differ), exactly."""
    run, _ = runs[layout]
    assert_planner_agrees(run, TRAFFIC)
    stages = {read_metrics(run.run_dir, r)[0]["mem_model_state_bytes"] for r in range(run.nproc)}
    assert len(stages) > 1  # the stages really hold different parts


@pytest.mark.parametrize("layout", [n for n in ALL if n not in CHECKPOINTED])
def test_reported_traffic_is_what_torch_distributed_was_handed(layout: str, runs: dict) -> None:
    assert_counters_honest(
        runs[layout][0],
        ["comm_p2p_bytes", "comm_all_reduce_bytes", "comm_all_gather_bytes", "comm_reduce_scatter_bytes"],
    )


@pytest.mark.parametrize("layout", ["pp2v2-dp2-interleaved", "pp4-zb-h2", "pp2-dp2-tp2-sp-zb", "pp2-dp2-terapipe"])
def test_runs_leave_a_trace_the_schedule_tool_measures(layout: str, runs: dict, tmp_path: Path) -> None:
    run, _ = runs[layout]
    pp = 4 if "pp4" in layout else 2
    # one trace per stage, from tp rank 0 of the first data-parallel replica
    assert sorted(p.name for p in (run.run_dir / "pp_trace").iterdir()) == [f"rank{r}.json" for r in range(pp)]
    drawn = cli("schedule", "--trace", str(run.run_dir), "--out", str(tmp_path / "trace.png"), timeout=60)
    assert drawn.returncode == 0 and "measured bubble" in drawn.stdout, drawn.stderr
    assert (tmp_path / "trace.png").stat().st_size > 1000


def test_a_wrong_custom_schedule_is_refused_before_spawning(tmp_path: Path) -> None:
    custom = _custom_schedule(tmp_path)
    wrong = cli(
        "train",
        "--config",
        "configs/tiny.toml",
        "--nproc",
        "2",
        "--set",
        "parallel.pp=2",
        "--set",
        f"parallel.pp_schedule={custom}",
        "--set",
        "training.micro_batch=1",
        timeout=60,
    )
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "microbatches" in wrong.stderr


def _copy_checkpoint(source: Path, step: int, target: Path) -> None:
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)


def test_checkpoints_cross_between_pipelined_and_plain_runs(runs: dict, tmp_path: Path) -> None:
    """Stages save their own blocks, tp ranks full-shape DTensors: the keys and shapes of a plain run.
    pp2 x dp2 x tp2's step-2 checkpoint continues in one process; the plain one as pp2 x tp2 and pp2."""
    _copy_checkpoint(runs["pp2-dp2-tp2-sp-zb"][0].run_dir, 2, tmp_path / "to-plain")
    _copy_checkpoint(runs["single"][0].run_dir, 2, tmp_path / "to-pp-tp")
    _copy_checkpoint(runs["pp2-tp2-1f1b"][0].run_dir, 2, tmp_path / "pp-tp-to-pp")
    resume = "checkpoint.resume=auto"
    tails = train_runs(
        [
            Run(tmp_path / "to-plain", 1, [*BASE, resume]),
            Run(tmp_path / "to-pp-tp", 4, [*BASE, *LAYOUTS["pp2-tp2-1f1b"][1], resume]),
            Run(tmp_path / "pp-tp-to-pp", 2, [*BASE, "parallel.pp=2", resume]),
        ]
    )
    for tail in tails:
        assert [r["step"] for r in tail] == [3]
        assert_same_training(tail, runs["single"][1][2:], loss=1e-5, grad_norm=1e-5)
