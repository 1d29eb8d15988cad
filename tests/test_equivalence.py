"""The equivalence matrix for data parallelism: every layout trains to the single-device losses and
gradient norms, sends what theory says, and holds what the planner predicts, on every rank.

All layouts train in one pool of real gloo ranks (tests/dist_utils.py), through the same Trainer and
build path as `meshtrain train`. The global batch is fixed (8 sequences), so layouts differ only in
how it is split over ranks and micro-steps. Communication is counted twice: by meshtrain (CommStats,
in metrics) and, independently, by a wrapper around torch.distributed (tests/comm_counter.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from checks import assert_counters_honest, assert_planner_agrees, assert_same_training, counted, rel_diff
from comm_counter import load_counts
from dist_utils import Run, read_metrics, train_named

pytestmark = pytest.mark.dist
STEPS = 5
PSI = 131392  # the tiny model, counted by hand in test_model.py
SPECS = {  # name: (nproc, overrides)
    "single": (1, ["training.micro_batch=8"]),
    "accum4": (1, ["training.micro_batch=2"]),
    "dp2": (2, ["training.micro_batch=4"]),
    "dp2-accum2": (2, ["training.micro_batch=2"]),
    "dp4": (4, ["training.micro_batch=2"]),
    "dp4-accum2": (4, ["training.micro_batch=1"]),
    "hybrid-2x2": (4, ["parallel.dp_replicate=2", "training.micro_batch=2"]),
    "dp2-small-buckets": (2, ["training.micro_batch=4", "parallel.bucket_mb=0.05"]),
    "dp2-recompute": (2, ["training.micro_batch=4", "training.activation_checkpointing=full"]),
    "dp2-bf16": (2, ["training.micro_batch=4", "training.dtype=bf16"]),
    "dp2-bf16-reduce": (2, ["training.micro_batch=4", "parallel.reduce_dtype=bf16"]),
}
LAYOUTS = [name for name in SPECS if name != "single"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, list[dict]]]:
    root = tmp_path_factory.mktemp("dp")
    specs = {name: Run(root / name, n, [f"training.steps={STEPS}", *o]) for name, (n, o) in SPECS.items()}
    return train_named(specs)


EXACT = [n for n in LAYOUTS if "bf16" not in n]


@pytest.mark.parametrize("layout", EXACT)
def test_layout_matches_single_device(layout: str, runs: dict) -> None:
    run, got = runs[layout]
    assert_same_training(got, runs["single"][1], loss=1e-6, grad_norm=1e-5)
    # every rank reports the same global loss
    for rank in range(run.nproc):
        assert [r["loss"] for r in read_metrics(run.run_dir, rank)] == [r["loss"] for r in got]


@pytest.mark.parametrize("layout", EXACT)
def test_traffic_is_one_all_reduce_of_every_gradient(layout: str, runs: dict) -> None:
    """4 psi bytes all-reduced per optimizer step whatever the accumulation, seen by torch.distributed
    itself; nothing else but the loss scalar."""
    run, _ = runs[layout]
    for rank in range(run.nproc):
        seen = load_counts(run.run_dir, rank)
        assert seen["bytes"].get("all_reduce", 0) == (STEPS * 4 * PSI if run.nproc > 1 else 0)
        assert set(seen["bytes"]) <= {"all_reduce", "scalar"}
        if run.nproc > 1:  # one collective per bucket per step: none on accumulation micro-steps
            buckets = 1 if "small-buckets" not in layout else seen["calls"]["all_reduce"] // STEPS
            assert seen["calls"]["all_reduce"] == STEPS * buckets
            assert buckets > 1 or "small-buckets" not in layout
    assert_counters_honest(run, ["comm_all_reduce_bytes"])
    assert_planner_agrees(run)


def test_bf16_autocast_changes_the_numbers_but_not_the_training(runs: dict) -> None:
    """bf16 really runs (the losses move off fp32's) and stays close; the weights stay fp32 masters
    (16 bytes per element) and gradients are reduced in fp32."""
    run, got = runs["dp2-bf16"]
    ref = runs["single"][1]
    assert 1e-6 < rel_diff([r["loss"] for r in got], [r["loss"] for r in ref]) < 2e-2
    assert all(r["mem_model_state_bytes"] == 16 * PSI for r in got)
    assert load_counts(run.run_dir, 0)["dtypes"]["all_reduce"] == ["float32"]


def test_bf16_gradient_reduction_sends_half_the_bytes(runs: dict) -> None:
    run, got = runs["dp2-bf16-reduce"]
    assert 0 < rel_diff([r["loss"] for r in got], [r["loss"] for r in runs["single"][1]]) < 2e-2
    seen = load_counts(run.run_dir, 1)
    assert seen["dtypes"]["all_reduce"] == ["bfloat16"] and counted(run, 1)["all_reduce"] == STEPS * 2 * PSI
    assert_counters_honest(run, ["comm_all_reduce_bytes"])


def test_accumulation_alone_communicates_nothing(runs: dict, tmp_path: Path) -> None:
    run, got = runs["accum4"]
    assert all(r["comm_all_reduce_bytes"] == 0 and r["comm_wire_bytes"] == 0 for r in got)
    assert load_counts(run.run_dir, 0)["bytes"].get("all_reduce", 0) == 0
