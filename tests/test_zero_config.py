"""Pure tests: ZeRO's config checks and the planner's per-run predictions for each ZeRO variant."""
from __future__ import annotations

import pytest

from meshtrain.config import ConfigError, load_config
from meshtrain.planner import predict_run
from meshtrain.validate import validate

PSI = 131392  # the tiny model
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "training.micro_batch=2",
        "training.global_batch=8"]


def _predict(world: int, *extra: str) -> dict:
    return predict_run(load_config(None, TINY + list(extra)), world)


def test_offload_needs_a_zero_stage() -> None:
    with pytest.raises(ConfigError, match="parallel.offload=true needs parallel.zero_stage >= 1"):
        validate(load_config(None, ["parallel.offload=true"]), 2)


def test_zero_with_pipeline_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="parallel.zero_stage=1 with pp=2, tp=1 is not supported"):
        validate(load_config(None, ["parallel.zero_stage=1", "parallel.pp=2", "parallel.dp_shard=1",
                                    "training.global_batch=2"]), 2)


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
