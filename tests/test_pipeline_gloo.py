"""Every schedule, run by the real executor over gloo P2P, against the single-device model.

One launch per pipeline size runs all schedules, checking the loss (forward) and every parameter's
gradient (backward), and the activations each rank really holds: every tensor autograd saves is
tracked (saved-tensor hooks) until autograd lets it go, and the peak of those bytes must equal what
a walk over the rank's action list predicts from the simulator's convention (an F adds its stage's
bytes, the matching B or BW frees them) and, one stage per rank, the simulator's in-flight count
times one microbatch's bytes. An executor that held activations longer, or freed them early, fails.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

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
from meshtrain.pipeline.schedules import SCHEDULES, Kind, Layout, layout_of, native_chunks
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


def _run_schedule(rank: int, pp: int, name: str, chunks: int, m: int, slices: int = 1) -> None:
    cfg = _cfg(max(4, pp * chunks))
    torch.manual_seed(0)
    data = torch.randint(0, 64, (m, MICRO, SEQ + 1))
    # each microbatch owns its storage, as the dataset's batches do (the memory check counts storages)
    tokens, targets = [d[:, :-1].clone() for d in data], [d[:, 1:].clone() for d in data]
    scale = 1.0 / (m * MICRO * SEQ)
    ref_loss, ref_grads = _reference(cfg, tokens, targets, scale)
    n_stages = pp * chunks
    ranges = stage_ranges(split_blocks(cfg, n_stages, "uniform"))
    layout = Layout.looped(pp, chunks, slices) if slices > 1 else layout_of(name, pp, chunks)
    schedule = SCHEDULES[name](pp, m, chunks, *([slices] if slices > 1 else []))
    stages = {
        s: build_stage(cfg, s, ranges[s], n_stages, torch.device("cpu"), seed=3)
        for s in range(n_stages)
        if layout.rank_of(s) == rank
    }
    ex = PipelineExecutor(
        stages,
        schedule[rank],
        layout,
        dist.group.WORLD,
        CommStats(),
        cross_entropy_sum,
        (MICRO, SEQ, cfg.dim),
        torch.device("cpu"),
        scale=scale,
    )
    if name.startswith("zb"):  # only zero-bubble schedules have W
        assert sum(split_weight_grads(stage, ex.queue) for stage in stages.values()) > 0
    static = {t.untyped_storage().data_ptr() for s in stages.values() for t in [*s.parameters(), *s.buffers()]}
    held = HeldActivations(static, stages)
    with held:
        loss = ex.run([Batch(x, y) for x, y in zip(tokens, targets)])
    dist.all_reduce(loss)  # only the last stage holds a loss
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss), (name, float(loss), ref_loss)
    for stage in stages.values():
        for n, p in stage.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=lambda s: f"{name} {n}: {s}")
    per_mb = {s: b / m for s, b in held.per_stage.items()}  # every microbatch of a stage saves the same
    assert held.live == 0, name  # everything released by the end of the step
    if slices > 1:  # a later slice saves more (its keys span the earlier ones): the per-microbatch walk is moot
        evaluated = ex.evaluate([Batch(x, y) for x, y in zip(tokens, targets)])  # whole sequences
        dist.all_reduce(evaluated)
        assert abs(float(evaluated) - ref_loss) <= 1e-5 * abs(ref_loss), (name, "evaluate", float(evaluated))
        return
    walked = _walk_peak(schedule[rank], per_mb)
    assert held.peak == pytest.approx(walked, rel=1e-9), (name, rank, held.peak, walked)
    if chunks == 1:  # one stage on this rank: the simulator's count times one microbatch's bytes
        assert held.peak == pytest.approx(simulate(schedule).peak_activations[rank] * per_mb[rank], rel=1e-9), name


class HeldActivations:
    """Bytes of the distinct storages autograd has saved and not yet released, per stage and in all.

    pack() hands autograd a holder; when autograd drops it (the graph is freed after backward), its
    finalizer releases the storage. Parameters and buffers are not activations and are left out."""

    def __init__(self, static: set[int], stages: dict[int, torch.nn.Module]) -> None:
        self.static, self.refs, self.sizes = static, defaultdict(int), {}
        self.live = self.peak = 0
        self.per_stage: dict[int, int] = defaultdict(int)
        self.current = -1
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda holder: holder.tensor)
        for s, module in stages.items():  # packs belong to the stage whose forward ran last (the loss too)
            module.register_forward_pre_hook(lambda *_, s=s: setattr(self, "current", s))

    def _pack(self, t: torch.Tensor) -> object:
        holder = _Holder(t)
        key = t.untyped_storage().data_ptr()
        if key not in self.static:
            if self.refs[key] == 0:
                self.sizes[key] = t.untyped_storage().nbytes()
                self.live += self.sizes[key]
                self.per_stage[self.current] += self.sizes[key]
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)

    def __enter__(self) -> None:
        self._hooks.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class _Holder:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _walk_peak(actions: list, per_mb: dict[int, float]) -> float:
    """Peak bytes over a rank's actions: F(s) holds per_mb[s] until the B or BW of the same (s, mb)."""
    live = peak = 0.0
    for a in actions:
        if a.kind == Kind.F:
            live += per_mb[a.stage]
        elif a.kind in (Kind.B, Kind.BW):
            live -= per_mb[a.stage]
        peak = max(peak, live)
    return peak


def _all_schedules(rank: int, world: int) -> None:
    m = 2 * world
    for name in SCHEDULES:
        chunks = native_chunks(name, 2 if name == "interleaved-1f1b" else 1)  # zb-v: 2, on the V
        _run_schedule(rank, world, name, chunks, m)
    _run_schedule(rank, world, "1f1b", 1, 1)  # fewer microbatches than stages
    for m, slices in ((1, 4), (2, 2)):  # token slices: one sequence in four; two in two
        _run_schedule(rank, world, "terapipe", 1, m, slices)
    dist.barrier()


@pytest.mark.parametrize("pp", [2, 4])
def test_every_schedule_matches_single_device(pp: int) -> None:
    spawn(_all_schedules, pp)
