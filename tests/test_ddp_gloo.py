"""Multi-process tests of the bucketed data-parallel engine against its single-device twin."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from comm_counter import CommCounter
from dist_utils import spawn
from meshtrain.accounting import CommStats
from meshtrain.config import ModelConfig
from meshtrain.data_parallel import DataParallel
from meshtrain.model import build_model

pytestmark = pytest.mark.dist
CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)
GLOBAL, SEQ = 8, 16


def _loss(model, x, y, tokens: int) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum") / tokens


def _reference_grads() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    data = torch.randint(0, 64, (GLOBAL, SEQ + 1))
    model = build_model(CFG, seed=7)
    _loss(model, data[:, :-1], data[:, 1:], GLOBAL * SEQ).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_grads(rank: int, world: int, micro_steps: int, bucket_bytes: int, reduce_dtype: torch.dtype) -> None:
    ref = _reference_grads()
    torch.manual_seed(0)
    data = torch.randint(0, 64, (GLOBAL, SEQ + 1))
    mine = data.chunk(world)[rank].chunk(micro_steps)
    model = build_model(CFG, seed=7)
    stats = CommStats()
    engine = DataParallel(model, dist.group.WORLD, stats, bucket_bytes=bucket_bytes, reduce_dtype=reduce_dtype)
    counter = CommCounter().install()
    for i, batch in enumerate(mine):
        engine.set_sync(i == micro_steps - 1)
        _loss(model, batch[:, :-1], batch[:, 1:], GLOBAL * SEQ).backward()
        if i < micro_steps - 1:  # accumulation micro-steps must not communicate
            assert not counter.calls
    engine.finish()
    counter.uninstall()
    tol = dict(rtol=1e-5, atol=1e-7) if reduce_dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], **tol, msg=lambda m: f"{name}: {m}")
    n_params = sum(p.numel() for p in model.parameters())
    sent = n_params * torch.finfo(reduce_dtype).bits // 8
    assert counter.bytes == {"all_reduce": sent} and stats.payload["all_reduce"] == sent
    assert counter.calls["all_reduce"] == len(engine.buckets) > 1


@pytest.mark.parametrize("world, micro_steps", [(2, 1), (2, 2), (4, 2)])
def test_bucketed_all_reduce_matches_single_device(world: int, micro_steps: int) -> None:
    spawn(_check_grads, world, micro_steps, 8 * 1024, torch.float32)


def test_bf16_reduction_is_close() -> None:
    spawn(_check_grads, 2, 1, 8 * 1024, torch.bfloat16)
