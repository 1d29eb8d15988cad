"""Shared benchmark plumbing: spawn gloo ranks, build the model, time contenders fairly, record results.

Fairness: every contender runs in the same processes on the same data; each round runs every
contender once, in an order shuffled afresh per round (the same order on every rank, from a shared
seed), so drift and warm caches hit all of them alike. A ratio is computed per round (the peer's
time over ours in that round) and reported as median with min and max: the spread is part of the
result. `--json FILE` appends each benchmark's rows there; benchmarks/run_all.py gathers them into
benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from meshtrain.config import ModelConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def bench_model_config() -> ModelConfig:
    """The README run's model (configs/default.toml), so benchmark figures describe real use."""
    return load_config(ROOT / "configs" / "default.toml").model


def train_default(run_dir: Path, nproc: int, overrides: list[str]) -> list[list[dict]]:
    """Train configs/default.toml through `meshtrain train` on `nproc` ranks (no checkpoints, no
    sample, no progress bar, then `overrides`); every rank's metrics records, rank 0's first."""
    args = [sys.executable, "-m", "meshtrain", "train", "--config", str(ROOT / "configs" / "default.toml")]
    args += ["--nproc", str(nproc), "--run-dir", str(run_dir), "--overwrite"]
    for item in ["checkpoint.interval=0", "logging.sample_prompt=", "logging.progress=false", *overrides]:
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{proc.stderr[-3000:]}")
    return [
        [json.loads(line) for line in (run_dir / f"metrics.rank{r}.jsonl").read_text().splitlines() if line.strip()]
        for r in range(nproc)
    ]


def _entry(rank: int, fn: Callable[..., Any], world: int, store: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    fn(rank, world, *args)
    dist.destroy_process_group()
    os._exit(0)  # skip gloo's occasionally aborting interpreter teardown


def spawn(fn: Callable[..., Any], world: int, *args: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world, os.path.join(tmp, "store"), args), nprocs=world, join=True)


@dataclass
class Timing:
    """Seconds per step of one contender, one entry per round."""

    rounds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)


def timed_rounds(
    contenders: dict[str, Callable[[], None]], rounds: int, steps: int, seed: int = 0
) -> dict[str, Timing]:
    """Seconds per step for each contender per round; the order of contenders is shuffled every round."""
    for run in contenders.values():  # warm-up: allocator, kernel choice, first buckets
        for _ in range(2):
            run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    shuffle = random.Random(seed)  # the same seed on every rank: the same order, so collectives match
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                contenders[name]()
            dist.barrier()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: Timing(t) for name, t in times.items()}


@dataclass
class Ratio:
    """Our throughput over the peer's, round by round."""

    benchmark: str
    ours: str
    peer: str
    median: float
    min: float
    max: float
    ours_tokens_per_s: float
    peer_tokens_per_s: float
    note: str = ""

    def line(self) -> str:
        return (
            f"{self.ours} / {self.peer}: {self.median:.3f}x tokens/s (min {self.min:.3f}, max {self.max:.3f}; "
            f"{self.ours_tokens_per_s:,.0f} vs {self.peer_tokens_per_s:,.0f} tokens/s median)"
            + (f"\n    {self.note}" if self.note else "")
        )


def ratio(benchmark: str, timings: dict[str, Timing], ours: str, peer: str, tokens: int, note: str = "") -> Ratio:
    per_round = [p / o for o, p in zip(timings[ours].rounds, timings[peer].rounds)]
    return Ratio(
        benchmark,
        ours,
        peer,
        statistics.median(per_round),
        min(per_round),
        max(per_round),
        tokens / timings[ours].median,
        tokens / timings[peer].median,
        note,
    )


def record(args: argparse.Namespace, rows: list[Ratio]) -> None:
    """Print each ratio and, with --json, append it to that file."""
    for row in rows:
        print(row.line())
    if getattr(args, "json", None):
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({**asdict(row), "compile": getattr(args, "compile", "none")}) + "\n")


def bench_parser(doc: str | None, steps: int = 5, micro_batch: int = 8) -> argparse.ArgumentParser:
    """The options every benchmark shares: timing rounds, the batch shape, where results go."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="timing rounds; each runs every contender once, shuffled")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps per contender per round")
    p.add_argument("--micro-batch", type=int, default=micro_batch, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--json", help="append the ratios to this file (one JSON object per line)")
    return p


def add_compile_option(p: argparse.ArgumentParser) -> None:
    """--compile, for the benchmarks with a torch peer (run_all.py --compile-too runs them with it)."""
    p.add_argument(
        "--compile",
        choices=("none", "blocks"),
        default="none",
        help="torch.compile every block of both contenders (ours: training.compile's apply_compile; the peer as torchtitan does)",
    )


def compile_peer_blocks(layers: nn.ModuleDict, mode: str) -> None:
    """The peer's per-block compile, torchtitan's way: each block replaced by torch.compile(block),
    before FSDP2 / after DTensor TP, so the peer's module hooks sit outside the compiled block too."""
    if mode == "blocks":
        for name, block in list(layers.items()):
            layers[name] = torch.compile(block)


def profiled_all_reduce_bytes(step: Callable[[], None]) -> int:
    """fp32 bytes torch's gloo backend all-reduced during one call of `step`, read from torch.profiler
    (it sees collectives issued from C++, e.g. by DDP's reducer, which no Python wrapper does)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    total = 0
    for event in prof.events():
        if event.name == "gloo:all_reduce":
            for shape in event.input_shapes:
                if shape:
                    total += 4 * int(torch.Size(shape).numel())
    return total
