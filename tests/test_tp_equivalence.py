"""Tensor-parallel layouts train to the single-device losses, through the real CLI: alone, with plain DP,
and with ZeRO 1-3 (and pipelining) over dp_shard.

All runs use 8 query and 4 kv heads (tiny.toml has 4 and 2), so that tp = 4 divides both and
grouped-query attention is still exercised; the reference uses the same model.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import rel_diff, train
from test_equivalence import TRAFFIC, _planner_agrees

pytestmark = pytest.mark.dist
BASE = ("training.steps=5", "model.n_heads=8", "model.n_kv_heads=4")

ZERO_SHARDS_GRADS = ("parallel.zero_stage=2", "parallel.zero_stage=3")
ZERO_LAYOUTS = {  # tp2 x ZeRO over dp_shard=2, each tp rank's local shards sharded again: (nproc, overrides)
    "tp2-z3-dp2": (4, ["parallel.tp=2", "parallel.zero_stage=3", "training.micro_batch=4", "checkpoint.interval=3"]),
    "tp2-sp-z2-dp2-accum2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2",
                                 "training.micro_batch=2"]),
    "tp2-z1-dp2-accum2": (4, ["parallel.tp=2", "parallel.zero_stage=1", "training.micro_batch=2"]),
    "pp2-tp2-sp-z3-dp2": (8, ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                              "parallel.zero_stage=3", "training.micro_batch=2"]),
}
LAYOUTS = {  # name: (nproc, overrides)
    "tp2-accum2": (2, ["parallel.tp=2", "training.micro_batch=4"]),
    "tp4": (4, ["parallel.tp=4", "training.micro_batch=8"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "training.micro_batch=8",
                   "checkpoint.interval=3"]),
    "tp2xdp2": (4, ["parallel.tp=2", "training.micro_batch=2"]),
    "tp2-recompute": (2, ["parallel.tp=2", "training.micro_batch=8", "training.activation_checkpointing=full"]),
    **ZERO_LAYOUTS,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict]]]:
    out = {}
    for name, (nproc, overrides) in {"single": (1, ["training.micro_batch=8"]), **LAYOUTS}.items():
        run_dir = tmp_path_factory.mktemp(name)
        out[name] = run_dir, train(run_dir, nproc, *BASE, *overrides)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tp_layout_matches_single_device(layout: str, runs: dict) -> None:
    ref, got = runs["single"][1], runs[layout][1]
    assert rel_diff([r["loss"] for r in got], [r["loss"] for r in ref]) < 1e-5
    assert rel_diff([r["grad_norm"] for r in got], [r["grad_norm"] for r in ref]) < 1e-5
    assert all(r["comm_tp_block_bytes"] > 0 for r in got)


def test_tp_block_traffic_is_reported_per_step(runs: dict) -> None:
    # b*s*h*4 bytes per all-reduce, 4 per block per microbatch (2 forward, 2 backward)
    act = 8 * 32 * 64 * 4
    assert all(r["comm_tp_block_bytes"] == 4 * act for r in runs["tp4"][1])
    assert all(r["comm_tp_block_bytes"] == 4 * act for r in runs["tp2-accum2"][1])  # 2 micro x half the tokens


def test_resume_at_another_tp_degree(runs: dict, tmp_path: Path) -> None:
    """A tp=2 (SP) checkpoint of step 3 resumes at tp=4: weights and Adam moments are resharded."""
    src = runs["tp2-sp"][0] / "checkpoints" / "step_00000003"
    shutil.copytree(src, tmp_path / "checkpoints" / src.name)
    got = train(tmp_path, 4, *BASE, "parallel.tp=4", "training.micro_batch=8", "checkpoint.resume=auto")
    assert [r["step"] for r in got] == [4, 5]
    ref = runs["single"][1][3:]
    assert rel_diff([r["loss"] for r in got], [r["loss"] for r in ref]) < 1e-5


def test_bf16_tensor_and_sequence_parallel_trains(runs: dict, tmp_path: Path) -> None:
    got = train(tmp_path, 2, *BASE, "parallel.tp=2", "parallel.sequence_parallel=true", "training.micro_batch=4",
                "training.dtype=bf16")
    assert rel_diff([r["loss"] for r in got], [r["loss"] for r in runs["single"][1]]) < 2e-2


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tp_layouts_hold_and_send_what_the_planner_predicts(layout: str, runs: dict) -> None:
    """Model states to 2% (ZeRO padding included), and every collective's bytes exactly: TP's regions,
    SP's re-gathers and norm-gradient sum, the vocab-parallel loss, ZeRO's and the pipeline's traffic."""
    nproc, overrides = LAYOUTS[layout]
    keys = (*TRAFFIC, "comm_p2p_bytes")
    if "parallel.sequence_parallel=true" in overrides and any(z in overrides for z in ZERO_SHARDS_GRADS):
        # Under ZeRO-2/3 each rank sums over tp only the norm-weight pieces inside its own gradient
        # shard; which pieces those are depends on the flat layout, which the planner does not model.
        keys = tuple(k for k in keys if k not in ("comm_all_reduce_bytes", "comm_wire_bytes"))
    _planner_agrees(runs[layout][1][-1], nproc, [*BASE, *overrides], keys)


@pytest.mark.parametrize("nproc, overrides", [
    (1, ["training.micro_batch=8"]),  # neither tp nor ZeRO
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1", "training.micro_batch=8"]),
])
def test_tp_zero3_checkpoint_resumes_in_other_layouts(nproc: int, overrides: list[str], runs: dict,
                                                      tmp_path: Path) -> None:
    """tp2 x ZeRO-3's step-3 checkpoint: full-shape DTensors gathered from 2-D shards, scattered back into others."""
    src = runs["tp2-z3-dp2"][0] / "checkpoints" / "step_00000003"
    shutil.copytree(src, tmp_path / "checkpoints" / src.name)
    got = train(tmp_path, nproc, *BASE, *overrides, "checkpoint.resume=auto")
    assert [r["step"] for r in got] == [4, 5]
    assert rel_diff([r["loss"] for r in got], [r["loss"] for r in runs["single"][1][3:]]) < 1e-5
