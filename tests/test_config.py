"""Pure tests: config loading, overrides, and every cross-field validation message."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import config_error
from meshtrain.config import SECTIONS, Config, ConfigError, dump_toml, field_docs, load_config
from meshtrain.validate import validate

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_is_documented() -> None:
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"[{section}] fields without a doc line: {missing}"


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    for world in (1, 2, 4):
        if cfg.training.global_batch % (cfg.training.micro_batch * world) == 0:
            validate(cfg, world)


def test_overrides_convert_to_field_types() -> None:
    cfg = load_config(
        None,
        [
            "training.steps=7",
            "training.lr=1e-3",
            "model.tie_embeddings=true",
            "training.dtype=bf16",
            "parallel.bucket_mb=1",
        ],
    )
    assert cfg.training.steps == 7 and isinstance(cfg.training.steps, int)
    assert cfg.training.lr == 1e-3
    assert cfg.model.tie_embeddings is True
    assert cfg.training.dtype == "bf16"
    assert cfg.parallel.bucket_mb == 1.0 and isinstance(cfg.parallel.bucket_mb, float)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = validate(load_config(ROOT / "configs" / "tiny.toml", ["training.steps=11"]), 2)
    (tmp_path / "c.toml").write_text(dump_toml(cfg))
    again = load_config(tmp_path / "c.toml")
    assert again == cfg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainning.steps=3", "did you mean 'training'"),
        ("training.stepz=3", "did you mean 'training.steps'"),
        ("training.steps=abc", "training.steps='abc' is not a valid int"),
        ("model.tie_embeddings=maybe", "not a boolean"),
        ("training.dtype=fp16", "training.dtype='fp16' is not one of fp32, bf16"),
    ],
)
def test_bad_keys_and_values(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        validate(load_config(None, [override]), 1)


def _error(world: int, *overrides: str) -> str:
    return config_error(world, *overrides)


def test_world_size_must_match_the_degrees() -> None:
    msg = _error(4, "parallel.dp_shard=3", "training.global_batch=6")
    assert "dp_replicate*dp_shard*cp*tp*pp" in msg and "world size is 4" in msg and "--nproc 3" in msg


def test_dp_shard_minus_one_needs_divisible_world() -> None:
    msg = _error(3, "parallel.dp_replicate=2")
    assert "world size 3 is not divisible" in msg


def test_heads_divisible_by_tp() -> None:
    msg = _error(2, "parallel.tp=2", "model.n_kv_heads=1", "model.n_heads=8")
    assert "parallel.tp=2 must divide model.n_heads=8 and model.n_kv_heads=1" in msg


def test_batch_arithmetic_names_the_value_to_change() -> None:
    msg = _error(2, "training.global_batch=10", "training.micro_batch=2", "training.grad_accum=2")
    assert "training.global_batch=10 != micro_batch*grad_accum*dp = 2*2*2 = 8" in msg
    assert "set training.global_batch=8" in msg


def test_batch_suggests_grad_accum_when_it_divides() -> None:
    msg = _error(2, "training.global_batch=16", "training.micro_batch=2", "training.grad_accum=2")
    assert "training.grad_accum=4" in msg and "training.micro_batch=4" in msg


def test_grad_accum_is_derived_when_minus_one() -> None:
    cfg = validate(load_config(None, ["training.global_batch=16", "training.micro_batch=2"]), 2)
    assert cfg.training.grad_accum == 4 and cfg.parallel.dp_shard == 2


def test_seq_len_bounded_by_max_seq_len() -> None:
    msg = _error(1, "training.seq_len=2048", "model.max_seq_len=1024")
    assert "training.seq_len=2048 exceeds model.max_seq_len=1024" in msg


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ([], "parallel.ep=2 splits experts, but model.n_experts=0"),
        (["model.n_experts=3"], "model.n_experts=3 must be divisible by parallel.ep=2"),
        (["model.n_experts=4", "model.top_k=5"], "model.top_k=5 must be in 1 .. model.n_experts=4"),
        (["model.n_experts=4", "parallel.tp=2", "parallel.dp_shard=1"], "parallel.ep=2 must divide dp_shard*cp = 1"),
    ],
)
def test_expert_configs_are_checked(overrides: list[str], fragment: str) -> None:
    assert fragment in _error(2, "parallel.ep=2", "training.global_batch=4", *overrides)
    # MoE under tensor parallelism is refused, with the reason; capacity under CP too
    tp = _error(4, "model.n_experts=4", "parallel.ep=2", "parallel.tp=2", "training.global_batch=4")
    assert "model.n_experts=4 with parallel.tp=2 is not supported: tensor parallelism would have to split" in tp
    cp = _error(2, "model.n_experts=4", "model.capacity_factor=1.0", "parallel.cp=2", "training.global_batch=4")
    assert "model.capacity_factor=1.0 with parallel.cp=2 is not supported: capacity keeps" in cp
    zb = _error(2, "model.n_experts=4", "parallel.pp=2", "parallel.pp_schedule=zb-h1", "training.global_batch=4")
    assert "with parallel.pp_schedule=zb-h1 is not supported: the experts' grouped matmuls" in zb


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["training.seq_len=36"], "training.seq_len=36 must be divisible by 2*cp (zigzag"),
        (["parallel.cp_mode=ulysses", "training.seq_len=30"], "training.seq_len=30 must be divisible by cp = 4"),
        (
            ["parallel.cp_mode=ulysses", "model.n_kv_heads=2"],
            "splits heads over tp*cp = 4: model.n_heads=8 and model.n_kv_heads=2",
        ),
        (["parallel.cp_balance=sideways"], "parallel.cp_balance='sideways' is not one of zigzag, contiguous"),
    ],
)
def test_context_parallel_configs_are_checked(overrides: list[str], fragment: str) -> None:
    """Zigzag holds 2 chunks per rank (seq_len % 2cp), contiguous and Ulysses 1 (seq_len % cp);
    Ulysses splits both head counts over tp x cp."""
    assert fragment in _error(4, "parallel.cp=4", *overrides)


def test_context_parallel_configs_that_fit_are_accepted() -> None:
    validate(load_config(None, ["parallel.cp=4", "parallel.cp_balance=contiguous", "training.seq_len=36"]), 4)
    validate(load_config(None, ["parallel.cp=2", "parallel.cp_mode=ulysses", "model.n_kv_heads=2"]), 2)
    assert "has no effect with parallel.cp=1" in _error(1, "parallel.cp_balance=contiguous")


def test_unsupported_zero_stage_is_refused() -> None:
    assert "parallel.zero_stage=4 must be 0, 1, 2 or 3" in _error(2, "parallel.zero_stage=4")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["parallel.pp=2", "parallel.pp_chunks=2", "model.n_layers=2"],
            "parallel.pp*pp_chunks = 2*2 = 4 stages is more than model.n_layers=2",
        ),
        (["parallel.pp=2", "parallel.pp_chunks=2", "model.n_layers=4"], "needs parallel.pp_schedule=interleaved-1f1b"),
        (
            [
                "parallel.pp=2",
                "parallel.pp_chunks=2",
                "model.n_layers=4",
                "parallel.pp_schedule=interleaved-1f1b",
                "training.global_batch=6",
                "training.micro_batch=2",
            ],
            "multiple of parallel.pp=2",
        ),
        (["parallel.pp=2", "model.tie_embeddings=true"], "tie_embeddings=true is not supported with parallel.pp > 1"),
        (
            ["parallel.pp=2", "parallel.pp_split=1,2", "model.n_layers=4"],
            "positive block counts summing to model.n_layers=4",
        ),
    ],
)
def test_pipeline_config_errors(overrides: list[str], fragment: str) -> None:
    assert fragment in _error(2, "parallel.dp_shard=1", "training.global_batch=8", "training.micro_batch=2", *overrides)


def test_default_config_object_is_valid_on_four_ranks() -> None:
    assert validate(Config(), 4).parallel.dp_shard == 4
