"""Pure tests: ZeRO's config checks and the planner's per-run predictions for each ZeRO variant."""

from __future__ import annotations

import pytest

from meshtrain.config import ConfigError, load_config
from meshtrain.planner import predict_run
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
    with pytest.raises(ConfigError, match="parallel.zero_stage=3 with parallel.pp_schedule=zb-h1 is not supported"):
        validate(load_config(None, ["parallel.zero_stage=3", "parallel.pp=2", "parallel.pp_schedule=zb-h1"]), 4)
    assert (
        validate(load_config(None, ["parallel.zero_stage=3", "parallel.pp=2", "parallel.tp=2"]), 8).parallel.dp_shard
        == 2
    )


def test_zero2_under_a_zero_bubble_schedule_reduces_once() -> None:
    pp = ["parallel.zero_stage=2", "parallel.pp=2", "model.n_layers=4", "training.micro_batch=1"]
    once = _predict(4, *pp, "parallel.pp_schedule=zb-h1")
    each = _predict(4, *pp, "parallel.pp_schedule=1f1b")
    assert each["comm_reduce_scatter_bytes"] == 4 * once["comm_reduce_scatter_bytes"]  # 4 microbatches


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
