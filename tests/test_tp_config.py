"""Pure tests: tensor-parallel validation messages, and the plan's own checks."""

from __future__ import annotations

import pytest

from conftest import config_error
from meshtrain.config import load_config
from meshtrain.model import build_model
from meshtrain.tensor_parallel import LLAMA_PLAN
from meshtrain.tensor_parallel.plan import match_plan
from meshtrain.validate import validate

pytestmark = pytest.mark.pure

TINY = (
    "model.dim=64",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.vocab_size=256",
    "model.max_seq_len=64",
    "training.seq_len=32",
    "training.global_batch=8",
    "training.micro_batch=8",
)


def _error(world: int, *overrides: str) -> str:
    return config_error(world, *TINY, *overrides)


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["parallel.tp=3"], ["parallel.tp=3 must divide model.n_heads=8 and model.n_kv_heads=4"]),
        (["parallel.tp=4", "model.n_kv_heads=2"], ["parallel.tp=4", "model.n_kv_heads=2"]),
        (["parallel.tp=4", "model.ffn_dim=130"], ["MLP hidden size 130", "model.ffn_dim=130"]),
        (["parallel.tp=4", "model.vocab_size=258"], ["model.vocab_size=258", "pad the vocabulary to 260"]),
        (
            ["parallel.tp=4", "parallel.sequence_parallel=true", "training.seq_len=30"],
            ["training.seq_len=30", "sequence_parallel"],
        ),
        (["parallel.tp=2", "parallel.async_tp=true"], ["parallel.async_tp=true", "sequence_parallel=false"]),
        (["parallel.tp=1", "parallel.async_tp=true"], ["parallel.async_tp=true", "tp=1", "async_tp=false"]),
    ],
)
def test_tp_must_divide_the_model(overrides: list[str], fragments: list[str]) -> None:
    world = int(overrides[0].split("=")[1])
    msg = _error(world, *overrides)
    assert all(f in msg for f in fragments), msg


def test_tp_with_data_parallel_validates() -> None:
    cfg = validate(load_config(None, [*TINY, "parallel.tp=2", "training.micro_batch=2"]), 4)
    assert cfg.parallel.dp_shard == 2 and cfg.training.grad_accum == 2


def test_plan_matches_every_projection_once() -> None:
    cfg = load_config(None, list(TINY)).model
    hits = match_plan(build_model(cfg), LLAMA_PLAN)
    styles = [style for _, _, style in hits]
    assert styles.count("colwise") == cfg.n_layers * 5 and styles.count("rowwise") == cfg.n_layers * 2
    assert {name for name, _, style in hits if style.startswith("vocab")} == {"model.embed_tokens", "lm_head"}


def test_plan_errors_name_the_problem() -> None:
    model = build_model(load_config(None, list(TINY)).model)
    with pytest.raises(ValueError, match="unknown tensor-parallel style"):
        match_plan(model, {"lm_head": "diagonal"})
    with pytest.raises(ValueError, match="match no module"):
        match_plan(model, {**LLAMA_PLAN, "model.layers.*.mlp.w3": "colwise"})
    with pytest.raises(ValueError, match="several plan entries"):
        match_plan(model, {"lm_head": "vocab_head", "lm_*": "colwise"})
