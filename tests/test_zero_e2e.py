"""ZeRO end to end through the CLI: the same losses as one process for every stage, shard count,
accumulation, HSDP and offload; model-state and traffic bytes equal to the formulas (on a model whose
size does not divide by 4, so units are padded); ZeRO-3's gathered peak; exact resume and resharding;
ZeRO under pipelining (tp x ZeRO is in test_tp_equivalence.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import cli, read_metrics, rel_diff, train
from test_equivalence import _planner_agrees

pytestmark = pytest.mark.dist
# Psi = 105210 (not a multiple of 4): embedding 10752, four blocks of 20916, norm + head 10794
MODEL = ("model.dim=42", "model.n_heads=3", "model.n_kv_heads=1", "model.n_layers=4")
PSI, UNITS = 105210, 6
BASE = ("training.steps=5", *MODEL)

LAYOUTS = {  # name: (nproc, stage, micro-steps, overrides)
    "z1-dp2": (2, 1, 1, ["training.micro_batch=4"]),
    "z1-dp2-accum2": (2, 1, 2, ["training.micro_batch=2"]),
    "z1-dp4": (4, 1, 1, ["training.micro_batch=2"]),
    "z1-dp4-accum2": (4, 1, 2, ["training.micro_batch=1"]),
    "z2-dp2": (2, 2, 1, ["training.micro_batch=4"]),
    "z2-dp4": (4, 2, 1, ["training.micro_batch=2"]),
    "z2-dp4-accum2": (4, 2, 2, ["training.micro_batch=1"]),
    "z2-dp2-offload-accum2": (2, 2, 2, ["training.micro_batch=2", "parallel.offload=true"]),
    "z3-dp2": (2, 3, 1, ["training.micro_batch=4"]),
    "z3-dp2-accum2": (2, 3, 2, ["training.micro_batch=2"]),
    "z3-dp4-accum2": (4, 3, 2, ["training.micro_batch=1"]),
    "z3-dp4-recompute": (4, 3, 1, ["training.micro_batch=2", "training.activation_checkpointing=full"]),
    "z3-hsdp-2x2": (4, 3, 1, ["training.micro_batch=2", "parallel.dp_replicate=2"]),
}


def expected_state_bytes(stage: int, n: int, offload: bool) -> float:
    """fp32 bytes per rank: params 4, grads 4, Adam 8 per element; offload adds a host fp32 master."""
    sharded = {1: 8, 2: 12, 3: 16}[stage] * PSI / n
    whole = {1: 8, 2: 4, 3: 0}[stage] * PSI
    return whole + sharded + (4 * PSI / n if offload else 0)


def expected_traffic(stage: int, n: int, micro: int, replicas: int) -> dict[str, float]:
    """Per-step payload bytes: 2 Psi (ZeRO-1/2) or 3 Psi (ZeRO-3) elements, per micro-step where the
    stage reduces (or gathers) every micro-step; the ring sends (N-1)/N of each."""
    rs = 4 * PSI * (1 if stage == 1 else micro)
    ag = 4 * PSI * (2 * micro if stage == 3 else 1)
    ar = 4 * PSI / n if replicas > 1 else 0
    wire = (rs + ag) * (n - 1) / n + ar * 2 * (replicas - 1) / replicas
    return {"comm_reduce_scatter_bytes": rs, "comm_all_gather_bytes": ag, "comm_all_reduce_bytes": ar,
            "comm_wire_bytes": wire}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return train(tmp_path_factory.mktemp("single"), 1, *BASE, "training.micro_batch=8")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero_matches_single_device_and_its_accounting(layout: str, reference: list[dict], tmp_path: Path) -> None:
    nproc, stage, micro, extra = LAYOUTS[layout]
    overrides = [*BASE, f"parallel.zero_stage={stage}", *extra]
    got = train(tmp_path, nproc, *overrides)
    assert rel_diff([r["loss"] for r in got], [r["loss"] for r in reference]) < 1e-5
    assert rel_diff([r["grad_norm"] for r in got], [r["grad_norm"] for r in reference]) < 1e-5
    replicas = 2 if "parallel.dp_replicate=2" in extra else 1
    n = nproc // replicas
    # padding (at most n-1 elements per unit) is the only difference from the formula
    formula = expected_state_bytes(stage, n, "parallel.offload=true" in extra)
    assert all(abs(r["mem_model_state_bytes"] - formula) <= 16 * (n - 1) * UNITS for r in got)
    for key, value in expected_traffic(stage, n, micro, replicas).items():
        assert all(r[key] == pytest.approx(value, abs=1) for r in got), key
    if stage == 3:  # the unit computing and the one prefetched, never the whole model
        assert all(r["zero3_peak_gathered_bytes"] <= 2 * r["zero3_unit_bytes_max"] for r in got)
        assert all(r["zero3_peak_gathered_bytes"] < 0.5 * 4 * PSI for r in got)
    _planner_agrees(got[-1], nproc, overrides)


PIPELINED = {  # pp2 x dp_shard2: name -> (stage, overrides); 2 or 4 microbatches per step
    "pp2-z1-1f1b": (1, ["parallel.pp=2", "training.micro_batch=2"]),
    # zero-bubble W accumulates weight gradients outside autograd: ZeRO-2 reduces once, in finish()
    "pp2-z2-zb-h1": (2, ["parallel.pp=2", "parallel.pp_schedule=zb-h1", "training.micro_batch=1"]),
    # otherwise per microbatch, from hooks: several buckets per stage, none spanning the rank's two stages
    "pp2v2-z2-interleaved": (2, ["parallel.pp=2", "parallel.pp_chunks=2", "parallel.pp_schedule=interleaved-1f1b",
                                 "training.micro_batch=1", "parallel.bucket_mb=0.05"]),
}


@pytest.mark.parametrize("layout", list(PIPELINED))
def test_zero_under_pipelining_matches_single_device(layout: str, reference: list[dict], tmp_path: Path) -> None:
    stage, extra = PIPELINED[layout]
    overrides = [*BASE, f"parallel.zero_stage={stage}", *extra]
    got = train(tmp_path, 4, *overrides)
    assert rel_diff([r["loss"] for r in got], [r["loss"] for r in reference]) < 1e-5
    assert rel_diff([r["grad_norm"] for r in got], [r["grad_norm"] for r in reference]) < 1e-5
    _planner_agrees(got[-1], 4, overrides)  # stage 0's states and traffic


def test_zero3_under_interleaved_pipelining_and_its_checkpoint(reference: list[dict], tmp_path: Path) -> None:
    """Two stages per rank, each cut into its own units; the step-3 checkpoint loads into ZeRO-1 without pp."""
    overrides = [*BASE, "parallel.zero_stage=3", "parallel.pp=2", "parallel.pp_chunks=2",
                 "parallel.pp_schedule=interleaved-1f1b", "training.micro_batch=1", "checkpoint.interval=3"]
    got = train(tmp_path / "pp", 4, *overrides)
    assert rel_diff([r["loss"] for r in got], [r["loss"] for r in reference]) < 1e-5
    assert rel_diff([r["grad_norm"] for r in got], [r["grad_norm"] for r in reference]) < 1e-5
    assert all(r["zero3_peak_gathered_bytes"] <= 2 * r["zero3_unit_bytes_max"] for r in got)
    _planner_agrees(got[-1], 4, overrides)
    step3 = "checkpoints/step_00000003"
    shutil.copytree(tmp_path / "pp" / step3, tmp_path / "z1" / step3)
    tail = train(tmp_path / "z1", 2, *BASE, "parallel.zero_stage=1", "training.micro_batch=4", "checkpoint.resume=auto")
    assert [r["step"] for r in tail] == [4, 5]
    assert rel_diff([r["loss"] for r in tail], [r["loss"] for r in reference[3:]]) < 1e-5


RUN = ("training.steps=20", "checkpoint.interval=10", "training.micro_batch=2", *MODEL)


def test_zero3_resumes_exactly_and_reshards_into_zero1(tmp_path: Path) -> None:
    z3 = ("parallel.zero_stage=3",)
    straight = train(tmp_path / "straight", 2, *RUN, *z3)
    args = ["train", "--config", "configs/tiny.toml", "--nproc", "2", "--run-dir", str(tmp_path / "restarted"),
            "--max-restarts", "1"]
    for item in RUN + z3 + ("checkpoint.resume=auto",):
        args += ["--set", item]
    proc = cli(*args, env={"MESHTRAIN_FAULT": "after_step:10"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    resumed = read_metrics(tmp_path / "restarted")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]
    # the step-10 checkpoint of ZeRO-3 on 2 shards, continued by ZeRO-1 on 4: full tensors by name
    resharded = tmp_path / "resharded" / "checkpoints"
    resharded.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_00000010", resharded / "step_00000010")
    tail = train(tmp_path / "resharded", 4, *RUN, "parallel.zero_stage=1", "training.micro_batch=1",
                 "checkpoint.resume=auto")
    assert [r["step"] for r in tail] == list(range(11, 21))
    assert rel_diff([r["loss"] for r in tail], [r["loss"] for r in straight[10:]]) < 1e-5
