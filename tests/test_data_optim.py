"""Pure tests: packing, the distributed sampler, our AdamW against torch's, and the LR schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshtrain.config import ConfigError, DataConfig, OptimizerConfig, TrainingConfig
from meshtrain.data import BatchSampler, build_dataset, build_tokenizer
from meshtrain.data.dataset import PackedDataset, held_out
from meshtrain.optim import AdamW, lr_at

pytestmark = pytest.mark.pure


def test_packing_windows_shift_by_one() -> None:
    ds = PackedDataset(np.arange(100), seq_len=10)
    assert len(ds) == 9
    x, y = ds.batch(np.array([0, 3]))
    assert x[1].tolist() == list(range(30, 40)) and y[1].tolist() == list(range(31, 41))


@pytest.mark.parametrize("dp, micro", [(1, 2), (2, 2), (4, 1), (2, 4)])
def test_ranks_partition_the_same_global_batch(dp: int, micro: int) -> None:
    samplers = [BatchSampler(1000, 8, micro, r, dp, seed=5) for r in range(dp)]
    for step in (0, 1, 124, 125, 300):  # 125 steps per epoch: cross the epoch boundary
        parts = [s.rank_indices(step) for s in samplers]
        assert all(p.shape == (8 // dp // micro, micro) for p in parts)
        union = np.concatenate([p.ravel() for p in parts])
        assert len(set(union.tolist())) == 8
        np.testing.assert_array_equal(np.sort(union), np.sort(samplers[0].global_indices(step)))


def test_sampler_covers_each_epoch_without_repeats() -> None:
    s = BatchSampler(64, 8, 2, 0, 1, seed=1)
    seen = np.concatenate([s.global_indices(k) for k in range(8)])
    assert sorted(seen.tolist()) == list(range(64))


def test_stdlib_corpus_is_real_text() -> None:
    tok = build_tokenizer("byte")
    ds = build_dataset(DataConfig(source="stdlib", max_tokens=50_000), tok, 64, seed=0)
    assert len(ds) == (50_000 - 1) // 64
    assert "import" in tok.decode(ds.tokens[:50_000].tolist())


def test_adamw_matches_torch() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4)
    b = torch.randn(4)
    ours_params = [w.clone(), b.clone()]
    ref_params = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    cfg = OptimizerConfig(weight_decay=0.1)
    ours = AdamW([("w", ours_params[0]), ("b", ours_params[1])], cfg, no_decay={"b"})
    ref = torch.optim.AdamW(
        [{"params": [ref_params[0]], "weight_decay": 0.1}, {"params": [ref_params[1]], "weight_decay": 0.0}],
        lr=1e-2,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    for _ in range(5):
        grads = [torch.randn(8, 4), torch.randn(4)]
        ours.step(grads, lr=1e-2)
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        ref.step()
    for o, r in zip(ours_params, ref_params):
        torch.testing.assert_close(o, r.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_schedules_warm_up_then_end_where_they_should(schedule: str) -> None:
    t = TrainingConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule=schedule, min_lr_ratio=0.1)
    lrs = [lr_at(s, t) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(1.0 if schedule == "constant" else 0.1, abs=0.02)
    if schedule == "wsd":
        assert lrs[70] == pytest.approx(1.0)


def test_the_validation_split_is_the_streams_last_sequences() -> None:
    """10 sequences of 4 (41 tokens): val_fraction 0.2 holds out the last 2, training keeps the first 8
    (their windows end where the held-out ones start); 0 keeps all 10 and has no validation split."""
    tokens = np.arange(41)
    train, val = held_out(tokens, 4, 0.2, "train"), held_out(tokens, 4, 0.2, "val")
    assert (len(train), len(val)) == (8, 2)
    x, y = val.batch(np.array([0, 1]))
    assert x.tolist() == [[32, 33, 34, 35], [36, 37, 38, 39]] and y[-1].tolist() == [37, 38, 39, 40]
    assert train.batch(np.array([7]))[1].tolist() == [[29, 30, 31, 32]]
    assert len(held_out(tokens, 4, 0.0, "train")) == 10
    with pytest.raises(ConfigError, match="no validation split"):
        held_out(tokens, 4, 0.0, "val")
