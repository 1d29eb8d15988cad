"""The layout search: only layouts that fit, tp inside a node, reproducible ranking."""

from __future__ import annotations

import dataclasses

import pytest

from meshtrain.planner.evaluate import Workload, evaluate
from meshtrain.planner.layout import Layout
from meshtrain.planner.presets import CLUSTERS, MODELS
from meshtrain.planner.search import SearchOptions, explain, search

pytestmark = pytest.mark.pure

# four GPUs per node, so tp <= 4 is a real constraint (the model has 8 kv heads)
SMALL_NODES = dataclasses.replace(CLUSTERS["h100-80gb"], name="h100x4", gpus_per_node=4)
WS = Workload(MODELS["llama3-8b"], SMALL_NODES, n_gpus=16, global_batch=32, seq_len=4096)


def test_search_returns_only_fitting_layouts_ranked() -> None:
    result = search(WS)
    assert result.ranked and result.considered > len(result.ranked)
    for plan in result.ranked:
        assert plan.fits and plan.memory_total <= SMALL_NODES.usable_bytes
        assert plan.layout.world_size == 16
        assert plan.layout.tp <= SMALL_NODES.gpus_per_node
        assert 8 % plan.layout.tp == 0 and 32 % plan.layout.tp == 0
    times = [p.step_time for p in result.ranked]
    # ranking rounds to nine significant digits before the tie-break
    assert all(a <= b * (1 + 1e-9) for a, b in zip(times, times[1:]))


def test_search_is_deterministic() -> None:
    a, b = search(WS), search(WS)
    assert [(p.layout, p.step_time) for p in a.ranked] == [(p.layout, p.step_time) for p in b.ranked]
    assert explain(a.ranked) == explain(b.ranked)


def test_nothing_fits_reports_the_smallest() -> None:
    tight = dataclasses.replace(SMALL_NODES, memory_gib=1.0)
    result = search(dataclasses.replace(WS, cluster=tight), SearchOptions(zero_stages=(0,)))
    assert result.ranked == []
    assert result.smallest is not None and result.smallest.memory_total > tight.usable_bytes


def test_explain_names_terms_and_knobs() -> None:
    ws = dataclasses.replace(WS, n_gpus=8)
    fast = evaluate(ws, Layout(tp=4, dp_shard=2, zero=1, micro_batch=1, recompute="full", sp=True))
    slow = evaluate(ws, Layout(tp=4, pp=2, dp_shard=1, zero=0, micro_batch=1, recompute="full", sp=True))
    ranked = sorted([fast, slow], key=lambda p: p.step_time)
    text = explain(ranked)
    assert "beats" in text and "pipeline bubble" in text and "pp 1 vs 2" in text


def test_moe_search_tries_expert_parallelism() -> None:
    moe = dataclasses.replace(MODELS["llama3-8b"], name="moe", n_experts=8, top_k=2, expert_ffn=7168)
    ws = Workload(moe, CLUSTERS["h100-80gb"], n_gpus=8, global_batch=16, seq_len=2048)
    result = search(ws, SearchOptions(zero_stages=(1,), recompute=("full",)))
    assert {p.layout.ep for p in result.ranked} > {1}
