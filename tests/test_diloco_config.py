"""Pure tests: DiLoCo's config checks (one line each, before any process) and its schedule arithmetic."""

from __future__ import annotations

import pytest

from conftest import config_error
from meshtrain.config import ConfigError, load_config
from meshtrain.diloco import OuterSettings, fragment_of
from meshtrain.planner.predict import predict_run
from meshtrain.validate import validate

pytestmark = pytest.mark.pure


def _error(world: int, *overrides: str) -> str:
    return config_error(world, *overrides)


@pytest.mark.parametrize(
    ("world", "overrides", "fragment"),
    [
        (4, ["diloco.inner_steps=0"], "diloco.inner_steps=0 must be"),
        (3, [], "world size 3 is not divisible by parallel.diloco=2"),
        (4, ["diloco.inner_steps=4", "diloco.fragments=3"], "diloco.fragments=3 must divide diloco.inner_steps=4"),
        (4, ["diloco.inner_steps=6", "diloco.fragments=6", "model.n_layers=4"], "exceeds model.n_layers=4"),
        (4, ["diloco.pseudo_grad_dtype=int4"], "diloco.pseudo_grad_dtype='int4' is not one of fp32, bf16, int8"),
        (4, ["diloco.pseudo_grad_dtype=int8", "diloco.int8_block=1"], "diloco.int8_block=1 must be at least 2"),
        (4, ["diloco.outer_lr=0"], "diloco.outer_lr=0.0 must be > 0"),
        (4, ["diloco.outer_momentum=1"], "diloco.outer_momentum=1.0 must be in [0, 1)"),
        (4, ["parallel.ep=2", "model.n_experts=4"], "parallel.diloco=2 with parallel.ep=2 is not supported"),
        (4, ["optimizer.name=onebit_adam", "optimizer.freeze_step=2"], "with optimizer.name=onebit_adam is not"),
        (2, ["diloco.join=nowhere"], "diloco.join='nowhere' must be HOST:PORT"),
        (2, ["diloco.join=localhost:29999", "diloco.island=2"], "diloco.island=2 must be in 0 .. parallel.diloco-1"),
        (4, ["training.global_batch=6", "training.micro_batch=2"], "training.global_batch=6 is not divisible"),
    ],
)
def test_bad_diloco_configs_get_one_line(world: int, overrides: list[str], fragment: str) -> None:
    assert fragment in _error(world, "parallel.diloco=2", *overrides)


def test_join_needs_islands() -> None:
    assert "diloco.join='h:1' needs parallel.diloco > 1" in _error(1, "diloco.join=h:1")


def test_islands_count_in_the_world_and_the_global_batch() -> None:
    """2 islands on 8 ranks: each island is 4 ranks of dp_shard, and the global batch of 16 spreads
    over all 2 x 4 data ranks: 2 sequences each, one micro-batch of 2."""
    cfg = validate(load_config(None, ["parallel.diloco=2", "training.global_batch=16", "training.micro_batch=2"]), 8)
    assert cfg.parallel.dp_shard == 4 and cfg.parallel.degrees.world_size == 8
    assert cfg.training.grad_accum == 1
    # one island per launch (diloco.join): the launch's world is one island
    joined = ["parallel.diloco=2", "diloco.join=localhost:29999", "training.global_batch=16", "training.micro_batch=2"]
    cfg = validate(load_config(None, joined), 4)
    assert cfg.parallel.dp_shard == 4 and cfg.training.grad_accum == 1


def test_fragments_are_strided_layers_and_sync_in_turn() -> None:
    assert [fragment_of(f"model.layers.{i}.attn.wq.weight", 2) for i in range(4)] == [0, 1, 0, 1]
    assert fragment_of("model.embed.weight", 2) == fragment_of("head.weight", 2) == 0
    s = OuterSettings(4, 0.7, 0.9, "fp32", 2048, 2, False, 0, 12)
    # every inner_steps / fragments = 2 steps one fragment, in turn: each fragment every 4 steps
    assert [s.fragment_at(t) for t in range(1, 9)] == [None, 0, None, 1, None, 0, None, 1]
    plain = OuterSettings(3, 0.7, 0.9, "fp32", 2048, 1, False, 0, 12)
    assert [t for t in range(1, 10) if plain.fragment_at(t) is not None] == [3, 6, 9]


def test_the_planner_refuses_islands_rather_than_predict_one_big_layout() -> None:
    with pytest.raises(ConfigError, match="the planner does not model DiLoCo \\(parallel.diloco=2\\)"):
        predict_run(load_config(None, ["parallel.diloco=2"]), 4, 0)


def test_the_timeline_diagram_follows_the_runtime_schedule() -> None:
    """Overlap applies each mean at its fragment's next sync, H steps later; the last is still in flight."""
    from meshtrain.tools.diloco_diagram import Sync, timeline

    overlapped = OuterSettings(4, 0.7, 0.9, "fp32", 2048, 1, True, 0, 12)
    assert timeline(overlapped, 12) == [Sync(4, 0, 8), Sync(8, 0, 12), Sync(12, 0, None)]
    streaming = OuterSettings(4, 0.7, 0.9, "fp32", 2048, 2, False, 0, 8)
    assert timeline(streaming, 8) == [Sync(2, 0, 2), Sync(4, 1, 4), Sync(6, 0, 6), Sync(8, 1, 8)]
