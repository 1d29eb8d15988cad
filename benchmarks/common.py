"""Shared benchmark plumbing: spawn gloo ranks, build the model, time interleaved rounds fairly."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from meshtrain.config import ModelConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def bench_model_config() -> ModelConfig:
    """The README run's model (configs/default.toml), so benchmark figures describe real use."""
    return load_config(ROOT / "configs" / "default.toml").model


def _entry(rank: int, fn: Callable[..., Any], world: int, store: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    fn(rank, world, *args)
    dist.destroy_process_group()
    os._exit(0)  # skip gloo's occasionally aborting interpreter teardown


def spawn(fn: Callable[..., Any], world: int, *args: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world, os.path.join(tmp, "store"), args), nprocs=world, join=True)


def timed_rounds(contenders: dict[str, Callable[[], None]], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step for each contender, alternating rounds so drift hits all equally."""
    for run in contenders.values():  # warm-up: allocator, kernel choice, first buckets
        for _ in range(2):
            run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                run()
            dist.barrier()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_parser(doc: str | None, steps: int = 5, micro_batch: int = 8) -> argparse.ArgumentParser:
    """The options every benchmark shares: timing rounds and the batch shape."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="timing rounds per contender (median is reported)")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps per round")
    p.add_argument("--micro-batch", type=int, default=micro_batch, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    return p
