"""Every schedule, run by the real executor over gloo P2P, against the single-device model.

One launch per pipeline size runs all schedules, checking the loss (forward) and every parameter's
gradient (backward), and the executor's peak of live activations against the simulator's.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import spawn
from meshtrain.accounting import CommStats
from meshtrain.config import ModelConfig
from meshtrain.core.runner import Batch
from meshtrain.core.weight_grads import split_weight_grads
from meshtrain.loss import cross_entropy_sum
from meshtrain.model import build_model
from meshtrain.pipeline.executor import PipelineExecutor
from meshtrain.pipeline.schedules import SCHEDULES, Layout
from meshtrain.pipeline.stage import build_stage, split_blocks, stage_ranges
from meshtrain.tools.simulator import simulate

pytestmark = pytest.mark.dist
MICRO, SEQ = 2, 8


def _cfg(layers: int) -> ModelConfig:
    return ModelConfig(dim=32, n_layers=layers, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)


def _reference(cfg: ModelConfig, tokens: torch.Tensor, targets: torch.Tensor, scale: float):
    model = build_model(cfg, seed=3)
    loss = sum(cross_entropy_sum(model(x), y) for x, y in zip(tokens, targets))
    (loss * scale).backward()
    return float(loss), {n: p.grad for n, p in model.named_parameters()}


def _run_schedule(rank: int, pp: int, name: str, chunks: int, m: int) -> None:
    cfg = _cfg(max(4, pp * chunks))
    torch.manual_seed(0)
    data = torch.randint(0, 64, (m, MICRO, SEQ + 1))
    tokens, targets = list(data[..., :-1]), list(data[..., 1:])
    scale = 1.0 / (m * MICRO * SEQ)
    ref_loss, ref_grads = _reference(cfg, tokens, targets, scale)
    n_stages = pp * chunks
    ranges = stage_ranges(split_blocks(cfg, n_stages, "uniform"))
    layout = Layout.looped(pp, chunks)
    schedule = SCHEDULES[name](pp, m, chunks)
    stages = {s: build_stage(cfg, s, ranges[s], n_stages, torch.device("cpu"), seed=3)
              for s in range(n_stages) if layout.rank_of(s) == rank}
    ex = PipelineExecutor(stages, schedule[rank], layout, dist.group.WORLD, CommStats(), cross_entropy_sum,
                          (MICRO, SEQ, cfg.dim), torch.device("cpu"), scale=scale)
    if name.startswith("zb"):  # only zero-bubble schedules have W
        assert sum(split_weight_grads(stage, ex.queue) for stage in stages.values()) > 0
    loss = ex.run([Batch(x, y) for x, y in zip(tokens, targets)])
    dist.all_reduce(loss)  # only the last stage holds a loss
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss), (name, float(loss), ref_loss)
    for stage in stages.values():
        for n, p in stage.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=lambda s: f"{name} {n}: {s}")
    assert ex.peak_inflight == pytest.approx(simulate(schedule).peak_activations[rank]), name


def _all_schedules(rank: int, world: int) -> None:
    m = 2 * world
    for name in SCHEDULES:
        chunks = 2 if name == "interleaved-1f1b" else 1
        _run_schedule(rank, world, name, chunks, m)
    _run_schedule(rank, world, "1f1b", 1, 1)  # fewer microbatches than stages
    dist.barrier()


@pytest.mark.parametrize("pp", [2, 4])
def test_every_schedule_matches_single_device(pp: int) -> None:
    spawn(_all_schedules, pp)
