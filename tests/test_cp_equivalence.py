"""Context-parallel layouts train to the single-device losses: ring (zigzag and contiguous) and
Ulysses, alone and with data parallelism, ZeRO 1 and 3 (which shard over dp_shard x cp), tensor
and sequence parallelism, pipelining, recomputation and accumulation; every rank sends and holds
what the planner predicts, and what meshtrain reports is what torch.distributed was handed;
a cp checkpoint resumes at another cp degree, in the other mode and on one process.

All runs use 8 query and 4 kv heads, so that Ulysses at cp = 4 (and cp x tp = 4) divides both; the
reference uses the same model. One pool of real gloo ranks trains them all (tests/dist_utils.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from checks import (
    TRAFFIC,
    assert_counters_honest,
    assert_planner_agrees,
    assert_same_training,
    rel_diff,
    zero_padding_slack,
)
from comm_counter import load_counts
from dist_utils import Run, read_metrics, train_named, train_runs

pytestmark = pytest.mark.dist
BASE = ("training.steps=5", "model.n_heads=8", "model.n_kv_heads=4")
ULYSSES = "parallel.cp_mode=ulysses"
LAYOUTS = {  # name: (nproc, overrides); global batch 8, seq_len 32
    "cp2": (2, ["parallel.cp=2", "training.micro_batch=8", "checkpoint.interval=3"]),
    "cp4": (4, ["parallel.cp=4", "training.micro_batch=8"]),
    "cp2-contiguous": (2, ["parallel.cp=2", "parallel.cp_balance=contiguous", "training.micro_batch=8"]),
    "cp4-contiguous-accum2": (4, ["parallel.cp=4", "parallel.cp_balance=contiguous", "training.micro_batch=4"]),
    "cp2-ulysses": (2, ["parallel.cp=2", ULYSSES, "training.micro_batch=8"]),
    "cp4-ulysses-accum2": (4, ["parallel.cp=4", ULYSSES, "training.micro_batch=4"]),
    "cp2xdp2": (4, ["parallel.cp=2", "training.micro_batch=4"]),
    "cp2-z3": (2, ["parallel.cp=2", "parallel.zero_stage=3", "training.micro_batch=8"]),
    "cp2-z1-dp2": (4, ["parallel.cp=2", "parallel.zero_stage=1", "training.micro_batch=4"]),
    "cp2-z3-dp2-accum2": (4, ["parallel.cp=2", "parallel.zero_stage=3", "training.micro_batch=2"]),
    "cp2-tp2-sp": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "training.micro_batch=8"]),
    "cp2-ulysses-tp2": (4, ["parallel.cp=2", ULYSSES, "parallel.tp=2", "training.micro_batch=8"]),
    "cp2-pp2": (4, ["parallel.cp=2", "parallel.pp=2", "training.micro_batch=2"]),
    "cp2-recompute": (2, ["parallel.cp=2", "training.micro_batch=8", "training.activation_checkpointing=full"]),
    "cp2-ulysses-recompute": (
        2,
        ["parallel.cp=2", ULYSSES, "training.micro_batch=8", "training.activation_checkpointing=full"],
    ),
    "cp2-bf16": (2, ["parallel.cp=2", "training.micro_batch=8", "training.dtype=bf16"]),
    "cp2-ulysses-bf16": (2, ["parallel.cp=2", ULYSSES, "training.micro_batch=8", "training.dtype=bf16"]),
}
EXACT = [name for name in LAYOUTS if "bf16" not in name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, list[dict]]]:
    root = tmp_path_factory.mktemp("cp")
    specs = {
        name: Run(root / name, nproc, [*BASE, *overrides])
        for name, (nproc, overrides) in {
            "single": (1, ["training.micro_batch=8", "checkpoint.interval=3"]),
            **LAYOUTS,
        }.items()
    }
    return train_named(specs)


@pytest.mark.parametrize("layout", EXACT)
def test_cp_layout_matches_single_device(layout: str, runs: dict) -> None:
    assert_same_training(runs[layout][1], runs["single"][1], loss=1e-5, grad_norm=1e-5)


def test_ring_traffic_is_the_schedule_written_here(runs: dict) -> None:
    """Per step, formula written here: each of 2 layers per microbatch sends its keys and values
    (b * s/cp tokens x 2 x kv_dim 32, fp32) cp - 1 times forward and again backward, and the
    travelling fp32 gradient cp times; Ulysses all-to-alls q, k, v and the output each way."""
    kv = 8 * 32 // 4 * 2 * 32 * 4  # cp4: micro-batch 8, 8 tokens per rank
    want = 2 * (3 * kv + 3 * kv + 4 * kv)
    for rank in range(4):
        assert all(r["comm_p2p_bytes"] == want for r in read_metrics(runs["cp4"][0].run_dir, rank))
    tokens = 4 * 32 // 4  # cp4-ulysses-accum2: 2 micro-batches of 4, 32 tokens per rank
    per_pass = tokens * (64 + 32 + 32 + 64) * 4
    for rank in range(4):
        assert all(
            r["comm_all_to_all_bytes"] == 2 * 2 * 2 * per_pass
            for r in read_metrics(runs["cp4-ulysses-accum2"][0].run_dir, rank)
        )


@pytest.mark.parametrize("layout", ["cp2-bf16", "cp2-ulysses-bf16"])
def test_bf16_context_parallel_trains_and_moves_bf16(layout: str, runs: dict) -> None:
    """bf16 really runs (the losses move off fp32's, a little); the ring's keys and values, and
    Ulysses' tensors, travel as bf16 (the ring's travelling gradient stays fp32)."""
    run, got = runs[layout]
    assert 1e-6 < rel_diff([r["loss"] for r in got], [r["loss"] for r in runs["single"][1]]) < 2e-2
    dtypes = load_counts(run.run_dir, 0)["dtypes"]
    kind = "all_to_all" if "ulysses" in layout else "p2p"
    assert dtypes[kind] == (["bfloat16"] if "ulysses" in layout else ["bfloat16", "float32"]), dtypes


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cp_layouts_hold_and_send_what_the_planner_predicts(layout: str, runs: dict) -> None:
    run, _ = runs[layout]
    assert_planner_agrees(run, TRAFFIC, state_slack=zero_padding_slack(run))


@pytest.mark.parametrize("layout", [n for n in LAYOUTS if "zero_stage" not in str(LAYOUTS[n][1])])
def test_reported_traffic_is_what_torch_distributed_was_handed(layout: str, runs: dict) -> None:
    assert_counters_honest(
        runs[layout][0],
        ["comm_all_reduce_bytes", "comm_all_gather_bytes", "comm_all_to_all_bytes", "comm_p2p_bytes"],
    )


def test_cp_checkpoints_resume_at_other_degrees_and_modes(runs: dict, tmp_path: Path) -> None:
    """The cp2 ring's step-3 checkpoint (full tensors by name) resumes at cp4, as Ulysses, and on one
    process; one process's resumes at cp2."""
    resume = "checkpoint.resume=auto"
    targets = {  # name: (nproc, overrides, whose checkpoint)
        "cp4": (4, ["parallel.cp=4"], "cp2"),
        "ulysses": (2, ["parallel.cp=2", ULYSSES], "cp2"),
        "plain": (1, [], "cp2"),
        "from-plain-to-cp2": (2, ["parallel.cp=2"], "single"),
    }
    for name, (*_, source) in targets.items():
        src = runs[source][0].run_dir / "checkpoints" / "step_00000003"
        shutil.copytree(src, tmp_path / name / "checkpoints" / src.name)
    tails = train_runs(
        [Run(tmp_path / n, k, [*BASE, *o, "training.micro_batch=8", resume]) for n, (k, o, _) in targets.items()]
    )
    for tail in tails:
        assert [r["step"] for r in tail] == [4, 5]
        assert rel_diff([r["loss"] for r in tail], [r["loss"] for r in runs["single"][1][3:]]) < 1e-5
