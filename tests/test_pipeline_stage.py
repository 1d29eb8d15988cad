"""Pure tests of stage partitioning and of the B/W backward split, ZeRO-3 under it included (no processes)."""

from __future__ import annotations

import pytest
import torch

from meshtrain.accounting import CommStats
from meshtrain.config import ModelConfig
from meshtrain.core.weight_grads import DeferredLinear, WeightGradQueue, split_weight_grads
from meshtrain.loss import cross_entropy_sum
from meshtrain.model import build_model
from meshtrain.pipeline.stage import balanced_split, block_costs, build_stage, split_blocks, stage_ranges
from meshtrain.zero import ShardGroups, Zero3

pytestmark = pytest.mark.pure

CFG = ModelConfig(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)


def test_balanced_split_minimises_the_largest_stage() -> None:
    assert balanced_split([1, 1, 1, 1], 2) == [2, 2]
    assert balanced_split([5, 1, 1, 1, 1, 5], 3) == [1, 4, 1]
    assert balanced_split([1] * 7, 3) in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    assert sum(balanced_split(block_costs(CFG), 4)) == 4


def test_explicit_and_uniform_splits() -> None:
    assert split_blocks(CFG, 2, "3,1") == [3, 1]
    assert split_blocks(CFG, 4, "uniform") == [1, 1, 1, 1]
    assert [list(r) for r in stage_ranges([1, 3])] == [[0], [1, 2, 3]]


def test_stages_compose_to_the_full_model() -> None:
    full = build_model(CFG, seed=5)
    ranges = stage_ranges([1, 2, 1])
    stages = [build_stage(CFG, s, r, 3, torch.device("cpu"), seed=5) for s, r in enumerate(ranges)]
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in full.named_parameters())
    x = torch.randint(0, 64, (2, 12))
    h = x
    for stage in stages:
        h = stage(h)
    torch.testing.assert_close(h, full(x))


def test_split_backward_b_then_w_equals_whole_backward() -> None:
    ref, split = build_model(CFG, seed=1), build_model(CFG, seed=1)
    queue = WeightGradQueue()
    assert split_weight_grads(split, queue) == 4 * 7 + 1
    assert isinstance(split.lm_head, DeferredLinear)  # swapped as a module; nothing replaces a forward
    assert [n for n, _ in split.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x, y = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    cross_entropy_sum(ref(x), y).backward()
    deferred: list = []
    queue.target = deferred
    cross_entropy_sum(split(x), y).backward()  # B: input and norm/embedding grads only
    queue.target = None
    assert split.lm_head.weight.grad is None and len(deferred) == 29
    for weight_grad in deferred:  # W
        weight_grad()
    for (name, p), q in zip(ref.named_parameters(), split.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{name}: {m}")


def test_zero3_frees_each_unit_after_b_and_reduces_it_after_its_w() -> None:
    """ZB-H1's order on one stage, B(0) B(1) W(0) W(1), on one-rank ZeRO-3 (no process group): W runs
    with every unit freed (it reads no weight), block units reduce nothing until their W, and the shards
    end equal to the gradients of one whole backward over both microbatches."""
    ref, model = build_model(CFG, seed=1), build_model(CFG, seed=1)
    queue = WeightGradQueue()
    split_weight_grads(model, queue)
    engine = Zero3(model, ShardGroups(None, None), CommStats(), weight_grads=queue)
    batches = [(torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))) for _ in range(2)]
    for x, y in batches:
        cross_entropy_sum(ref(x), y).backward()
    deferred: list[list] = [[], []]
    for (x, y), target in zip(batches, deferred):  # B(0), B(1)
        queue.target = target
        cross_entropy_sum(model(x), y).backward()
        queue.target = None
    engine.drain()
    blocks = [u for u in engine.units if u.layout.name.startswith("zero.layers.")]
    assert all(u.full.untyped_storage().size() == 0 for u in engine.units)
    assert all(u.grad_shard().eq(0).all() for u in blocks) and all(len(u.owed) == 2 for u in blocks)
    for target in deferred:  # W(0), W(1)
        for weight_grad in target:
            weight_grad()
        assert all(u.full.untyped_storage().size() == 0 for u in engine.units)
    engine.finish()
    grads = dict(ref.named_parameters())
    for unit in engine.units:
        for piece, (name, view) in zip(unit.layout.pieces, unit.layout.piece_views(unit.grad_shard())):
            want = grads[name].grad.reshape(-1)[piece.param_start : piece.param_start + piece.numel]
            torch.testing.assert_close(view, want, msg=lambda m: f"{name}: {m}")
