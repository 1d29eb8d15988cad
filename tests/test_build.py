"""What the build path's features do, observed from outside on real gloo ranks, so that a feature
switched off turns a test red:

- bf16: every matrix multiply of forward and backward runs in bf16 (DP, ZeRO-3, TP + SP), over fp32
  master weights; ZeRO-3 gathers bf16 copies.
- ZeRO-3 prefetch: the gather of unit k+1 is issued before unit k's forward ends; without prefetch,
  after (timestamps from hooks and a wrapper around torch.distributed).
- Overlap: DP's all-reduce and ZeRO-2's reduce-scatter start while backward is still running.

One launch of two ranks runs them all. Activation checkpointing's memory is in test_model.py, the
pipeline's measured activation memory in test_pipeline_gloo.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from comm_counter import CommCounter
from dist_utils import TINY, spawn
from meshtrain.accounting import CommStats
from meshtrain.build import ParallelModel, build_parallel
from meshtrain.config import Config, load_config
from meshtrain.core.runner import Batch
from meshtrain.topology import Topology
from meshtrain.validate import validate

pytestmark = pytest.mark.dist
MATMULS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten._scaled_dot_product")


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of the tensor inputs of every matrix multiply dispatched, and of the attention
    kernels' first input (their log-sum-exp statistics are fp32 by design)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        if name.startswith(MATMULS):
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            for a in tensors[:1] if "_scaled_dot_product" in name else tensors:
                self.seen.add((name.split(".")[1], str(a.dtype).removeprefix("torch.")))
        return func(*args, **(kwargs or {}))


def _build(world: int, overrides: list[str]) -> tuple[Config, ParallelModel]:
    cfg = validate(load_config(TINY, [*overrides, "logging.run_dir=/nonexistent"]), world)
    topo = Topology.build(cfg.parallel.degrees, torch.device("cpu"))
    return cfg, build_parallel(cfg, topo, torch.device("cpu"), CommStats())


def _batches(cfg: Config) -> list[Batch]:
    torch.manual_seed(0)
    t = cfg.training
    data = torch.randint(0, cfg.model.vocab_size, (t.grad_accum, t.micro_batch, t.seq_len + 1))
    return [Batch(d[:, :-1], d[:, 1:]) for d in data]


def _step(cfg: Config, pm: ParallelModel) -> None:
    pm.runner.run(_batches(cfg))
    pm.engine.finish()
    pm.engine.zero_grad()


def _check_bf16(world: int) -> None:
    for overrides in (
        ["training.micro_batch=4"],
        ["parallel.zero_stage=3", "training.micro_batch=4"],
        ["parallel.tp=2", "parallel.sequence_parallel=true", "training.micro_batch=8"],
    ):
        cfg, pm = _build(world, ["training.dtype=bf16", *overrides])
        counter, mode = CommCounter().install(), MatmulDtypes()
        with mode:
            _step(cfg, pm)
        counter.uninstall()
        assert {dtype for _, dtype in mode.seen} == {"bfloat16"}, (overrides, mode.seen)
        assert {op for op, _ in mode.seen} >= {"mm", "_scaled_dot_product_flash_attention_for_cpu"}, mode.seen
        # the optimizer steps fp32 masters; ZeRO-3 gathers bf16 copies of them
        assert all(t.dtype == torch.float32 for _, t in pm.engine.optim_params())
        if "parallel.zero_stage=3" in overrides:
            assert counter.dtypes["all_gather"] == {"bfloat16"}
        cfg, pm = _build(world, overrides)  # the same layout in fp32: no bf16 anywhere
        mode = MatmulDtypes()
        with mode:
            _step(cfg, pm)
        assert {dtype for _, dtype in mode.seen} == {"float32"}, (overrides, mode.seen)


@contextmanager
def _timed_collectives(name: str, log: list[tuple[str, Any, float]]) -> Iterator[None]:
    original = getattr(dist, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        log.append(("collective", args[0], time.perf_counter()))
        return original(*args, **kwargs)

    setattr(dist, name, wrapper)
    try:
        yield
    finally:
        setattr(dist, name, original)


def _gather_order(world: int, prefetch: bool) -> list[bool]:
    """For each unit k but the last: was unit k+1's gather issued before unit k's forward ended?"""
    cfg, pm = _build(
        world,
        [
            "parallel.zero_stage=3",
            "model.n_layers=4",
            f"parallel.prefetch={str(prefetch).lower()}",
            "training.micro_batch=4",
        ],
    )
    engine = pm.engine
    units = {id(u.full): i for i, u in enumerate(engine.units)}  # gathers write into each unit's own buffer
    log: list[tuple[str, Any, float]] = []
    model = pm.parts[0]
    ends = [model.model.embed_tokens, *model.model.layers.values(), model.lm_head]  # each unit's last module
    for i, module in enumerate(ends):
        module.register_forward_hook(lambda *_, i=i: log.append(("end", i, time.perf_counter())))
    with _timed_collectives("all_gather_single", log), torch.no_grad():
        model(_batches(cfg)[0].tokens, torch.arange(cfg.training.seq_len))
    gathered = {units[id(out)]: t for kind, out, t in log if kind == "collective" and id(out) in units}
    ended = {i: t for kind, i, t in log if kind == "end"}
    return [gathered[k + 1] < ended[k] for k in range(len(ends) - 1)]


def _check_prefetch(world: int) -> None:
    assert all(_gather_order(world, prefetch=True))
    assert not any(_gather_order(world, prefetch=False))


def _reduction_starts_during_backward(world: int, overrides: list[str], collective: str) -> None:
    cfg, pm = _build(world, ["parallel.bucket_mb=0.05", "training.micro_batch=4", *overrides])
    log: list[tuple[str, Any, float]] = []
    embedding = pm.parts[0].model.embed_tokens.weight  # the last gradient backward produces
    embedding.register_post_accumulate_grad_hook(lambda _: log.append(("last grad", None, time.perf_counter())))
    with _timed_collectives(collective, log):
        _step(cfg, pm)
    calls = [t for kind, out, t in log if kind == "collective" and out.numel() > 2]
    (last_grad,) = [t for kind, _, t in log if kind == "last grad"]
    assert len(calls) > 1 and calls[0] < last_grad, (overrides, len(calls))


def _all_checks(rank: int, world: int) -> None:
    _check_bf16(world)
    _check_prefetch(world)
    _reduction_starts_during_backward(world, [], "all_reduce")
    _reduction_starts_during_backward(world, ["parallel.zero_stage=2"], "reduce_scatter_single")


def test_build_path_features_do_what_they_say() -> None:
    spawn(_all_checks, 2)
