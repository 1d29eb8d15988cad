"""Pure tests: ZeRO's config checks and the planner's per-run predictions for each ZeRO variant."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshtrain.config import ConfigError, load_config
from meshtrain.model.math import from_model_config
from meshtrain.planner import predict_run
from meshtrain.planner.layout import rank_params
from meshtrain.planner.memory import FP32, MemoryInputs, rank_memory
from meshtrain.planner.predict import config_layout
from meshtrain.validate import validate

pytestmark = pytest.mark.pure

PSI = 131392  # the tiny model
TINY = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "training.micro_batch=2",
    "training.global_batch=8",
]


def _predict(world: int, *extra: str) -> dict:
    return predict_run(load_config(None, TINY + list(extra)), world)


def test_offload_needs_a_zero_stage() -> None:
    with pytest.raises(ConfigError, match="parallel.offload=true needs parallel.zero_stage >= 1"):
        validate(load_config(None, ["parallel.offload=true"]), 2)


def test_zero_composes_with_tp_or_pp_and_refuses_what_it_cannot() -> None:
    for stage in (1, 2, 3):
        assert validate(load_config(None, [f"parallel.zero_stage={stage}", "parallel.tp=2"]), 4).parallel.dp_shard == 2
        assert validate(load_config(None, [f"parallel.zero_stage={stage}", "parallel.pp=2"]), 4).parallel.dp_shard == 2
    assert validate(load_config(None, ["parallel.zero_stage=2", "parallel.pp=2", "parallel.pp_schedule=zb-h2"]), 4)
    for schedule in ("zb-h1", "zb-h2"):  # ZeRO-3 reduces a unit once its W has run (zero/stage3.py)
        zb3 = ["parallel.zero_stage=3", "parallel.pp=2", f"parallel.pp_schedule={schedule}"]
        assert validate(load_config(None, zb3), 4).parallel.dp_shard == 2
        assert validate(load_config(None, [*zb3, "parallel.tp=2", "parallel.sequence_parallel=true"]), 8)
    assert (
        validate(load_config(None, ["parallel.zero_stage=3", "parallel.pp=2", "parallel.tp=2"]), 8).parallel.dp_shard
        == 2
    )


def test_zero2_under_a_zero_bubble_schedule_reduces_once() -> None:
    pp = ["parallel.zero_stage=2", "parallel.pp=2", "model.n_layers=4", "training.micro_batch=1"]
    once = _predict(4, *pp, "parallel.pp_schedule=zb-h1")
    each = _predict(4, *pp, "parallel.pp_schedule=1f1b")
    assert each["comm_reduce_scatter_bytes"] == 4 * once["comm_reduce_scatter_bytes"]  # 4 microbatches


def test_zero3_under_a_zero_bubble_schedule_moves_what_1f1b_moves() -> None:
    """W reads no weight: per microbatch ZeRO-3 gathers a stage's Psi for F and again for B and
    reduce-scatters it once, fp32, whatever the schedule. 4 blocks of 49280 over pp 2, 4 microbatches;
    stage 0 adds the embedding (256 x 64), stage 1 the norm and head."""
    block, table = (PSI - 2 * 256 * 64 - 64) // 2, 256 * 64
    pp = ["parallel.zero_stage=3", "parallel.pp=2", "model.n_layers=4", "training.micro_batch=1"]
    for rank, psi in ((0, table + 2 * block), (3, 2 * block + 64 + table)):
        zb = predict_run(load_config(None, [*TINY, *pp, "parallel.pp_schedule=zb-h1"]), 4, rank)
        assert (zb["comm_all_gather_bytes"], zb["comm_reduce_scatter_bytes"]) == (2 * 4 * 4 * psi, 4 * 4 * psi)
        plain = predict_run(load_config(None, [*TINY, *pp, "parallel.pp_schedule=1f1b"]), 4, rank)
        assert all(zb[k] == plain[k] for k in ("comm_all_gather_bytes", "comm_reduce_scatter_bytes", "comm_wire_bytes"))


def test_zero3_under_a_zero_bubble_schedule_holds_the_norm_grads_until_w() -> None:
    """Two norms per block (and the final norm on the last stage), dim 64, fp32, unsharded."""
    cfg = validate(
        load_config(None, [*TINY, "parallel.zero_stage=3", "parallel.pp=2", "parallel.pp_schedule=zb-h2"]), 4
    )
    shape, lay = from_model_config(cfg.model, cfg.training.seq_len), config_layout(cfg)
    mi = MemoryInputs(cfg.training.seq_len, cfg.training.grad_accum, FP32, 4, "flash", cfg.parallel.bucket_mb)
    rp = rank_params(shape, lay, first=True, last=False, layers=1)
    key = "zero3 norm grads until W (zero-bubble)"
    assert [rank_memory(shape, lay, mi, rp, stage)[key] for stage in (0, 1)] == [2 * 64 * 4, 3 * 64 * 4]
    plain = replace(lay, schedule="1f1b")
    assert key not in rank_memory(shape, plain, mi, rp, 0)


def test_every_stage_validates_with_hybrid_sharding() -> None:
    for stage in (1, 2, 3):
        cfg = validate(load_config(None, [f"parallel.zero_stage={stage}", "parallel.dp_replicate=2"]), 4)
        assert (cfg.parallel.dp_shard, cfg.parallel.zero_stage) == (2, stage)


def test_model_states_per_stage_in_fp32() -> None:
    # 4 ranks, 2 micro-steps each: params 4 + grads 4 + Adam 8 bytes, sharded stage by stage
    assert _predict(4, "parallel.zero_stage=1")["mem_model_state_bytes"] == 8 * PSI + 8 * PSI / 4
    assert _predict(4, "parallel.zero_stage=2")["mem_model_state_bytes"] == 4 * PSI + 12 * PSI / 4
    assert _predict(4, "parallel.zero_stage=3")["mem_model_state_bytes"] == 16 * PSI / 4


def test_offload_adds_the_host_master_copy() -> None:
    out = _predict(2, "parallel.zero_stage=2", "parallel.offload=true")
    assert out["mem_host_bytes"] == (4 + 8 + 4) * PSI / 2  # master, Adam, gradient shard
    assert out["mem_model_state_bytes"] == 4 * PSI + 16 * PSI / 2


def test_zero3_gathers_in_the_compute_dtype() -> None:
    fp32 = _predict(2, "parallel.zero_stage=3")
    bf16 = _predict(2, "parallel.zero_stage=3", "training.dtype=bf16")
    assert fp32["comm_all_gather_bytes"] == 2 * 2 * 4 * PSI  # forward + backward, 2 micro-steps
    assert bf16["comm_all_gather_bytes"] == fp32["comm_all_gather_bytes"] / 2
    assert bf16["comm_reduce_scatter_bytes"] == fp32["comm_reduce_scatter_bytes"] == 2 * 4 * PSI


def test_hsdp_all_reduces_the_shard_once_per_step() -> None:
    out = _predict(4, "parallel.zero_stage=3", "parallel.dp_replicate=2", "training.micro_batch=1")
    assert out["comm_all_reduce_bytes"] == 4 * PSI / 2


ZPP = ["parallel.zero_stage=3", "parallel.zeropp_hpz=true", "parallel.node_size=2"]


def test_zeropp_refusals_name_the_fields_and_the_fix() -> None:
    cases = {
        "needs parallel.zero_stage=3 \\(ZeRO\\+\\+ extends ZeRO-3\\), not 2": [
            "parallel.zero_stage=2",
            "parallel.zeropp_qwz=true",
        ],
        "with parallel.ep=2 is not supported": [*ZPP, "parallel.ep=2", "model.n_experts=4"],
        "zeropp_block=7 must be even": ["parallel.zero_stage=3", "parallel.zeropp_qgz=true", "parallel.zeropp_block=7"],
        "parallel.node_size=3: the dp_shard x cp group \\[0, 1, 2, 3\\] has \\[1, 3\\] ranks": [
            *ZPP[:2],
            "parallel.node_size=3",
        ],
        "needs at least 2 ranks of a dp_shard x cp group per node, but parallel.node_size=1": [
            *ZPP[:2],
            "parallel.node_size=1",
        ],
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            validate(load_config(None, overrides), 4)
    # nodes default to the local world size: one node of 4 holds whole groups, so hpZ is allowed
    assert validate(load_config(None, ZPP[:2]), 4).parallel.zeropp_hpz
    with pytest.raises(ConfigError, match="parallel.node_size=1"):  # 4 ranks over 4 nodes of one
        validate(load_config(None, ZPP[:2]), 4, local_world=1)


def test_the_planner_refuses_zeropp_rather_than_predict_plain_zero3() -> None:
    with pytest.raises(ConfigError, match="the planner does not model ZeRO\\+\\+ \\(parallel.zeropp_qwz=true\\)"):
        _predict(4, "parallel.zero_stage=3", "parallel.zeropp_qwz=true")
