"""Real gloo processes for tests: run a function on N ranks, or train many runs in one pool of ranks.

Starting processes costs more than training a tiny model (torch's import alone takes about 2 s per
process here), so the equivalence matrix trains its layouts in one pool: the same `Trainer`, the same
build path and real collectives as `meshtrain train`, with a fresh process group per run. Only the
launcher is skipped; the end-to-end tests drive it through the CLI.

Ranks are forked from a forkserver that imported torch and meshtrain once for the whole session
(instead of a fresh interpreter importing them per rank): a 4-rank start falls from seconds to a
quarter of one. Nothing has run in the server (no thread pool, no process group), so each child
starts as clean as a spawned one; it gets the caller's environment as it is at that call (the
server's own dates from the session's first spawn), so per-test TMPDIR and friends still apply.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
TIMEOUT = timedelta(seconds=120)  # a hung collective fails the test instead of stalling the suite
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "meshtrain.trainer"])


def _start(fn: Callable[..., None], args: tuple[Any, ...], world: int) -> None:
    """fn(rank, env, *args) on `world` forkserver children; an exception on any rank fails the caller."""
    mp.start_processes(fn, args=(dict(os.environ), *args), nprocs=world, join=True, start_method="forkserver")


def _environment(env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)


def _entry(
    rank: int, env: dict[str, str], fn: Callable[..., None], world: int, store_path: str, args: tuple[Any, ...]
) -> None:
    _environment(env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    fn(rank, world, *args)  # an exception propagates to mp.spawn, which reports it in the parent
    dist.destroy_process_group()
    # gloo can abort in interpreter teardown ("terminate called without an active exception");
    # the work is done and checked, so skip the teardown.
    os._exit(0)


def spawn(fn: Callable[..., None], world: int, *args: Any) -> None:
    """fn(rank, world, *args) on `world` processes; an exception on any rank fails the caller."""
    with tempfile.TemporaryDirectory() as tmp:
        _start(_entry, (fn, world, os.path.join(tmp, "store"), args), world)


@dataclass
class Run:
    """One training run: `nproc` ranks, tiny.toml (or `config`) with these overrides, into `run_dir`."""

    run_dir: Path
    nproc: int
    overrides: list[str] = field(default_factory=list)
    config: Path = TINY
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for this run only (e.g. MESHTRAIN_FAULT)."""


def _train_runs(rank: int, env: dict[str, str], runs: list[Run], stores: str, count_comms: bool) -> None:
    _environment(env)
    from comm_counter import CommCounter
    from meshtrain.config import load_config
    from meshtrain.distributed import DistEnv
    from meshtrain.trainer import Trainer
    from meshtrain.validate import validate

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    for i, run in enumerate(runs):
        if rank >= run.nproc:
            continue  # this run needs fewer ranks than the pool has
        saved = {k: os.environ.get(k) for k in run.env}
        os.environ.update({**run.env, "RANK": str(rank)})
        cfg = validate(
            load_config(run.config, [*run.overrides, f"logging.run_dir={run.run_dir}", "logging.progress=false"]),
            run.nproc,
        )
        store = dist.FileStore(os.path.join(stores, f"run{i}"), run.nproc)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=run.nproc, timeout=TIMEOUT)
        trainer = Trainer(cfg, DistEnv(rank, run.nproc, rank, torch.device("cpu"), "gloo", 0))
        counter = CommCounter().install() if count_comms else None
        trainer.fit()
        if counter is not None:
            counter.uninstall()
            counter.save(run.run_dir / f"comm_counted.rank{rank}.json")
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    os._exit(0)


def train_runs(runs: list[Run], count_comms: bool = False) -> list[list[dict]]:
    """Train `runs` in order, in one pool of as many processes as the largest needs; return each run's
    metrics.jsonl records (rank 0's; every rank's are in metrics.rank{R}.jsonl). With `count_comms`,
    each rank also writes what tests/comm_counter.py saw it send during training (comm_counted.rank{R}.json)."""
    world = max(run.nproc for run in runs)
    with tempfile.TemporaryDirectory() as stores:
        _start(_train_runs, (runs, stores, count_comms), world)
    return [read_metrics(run.run_dir) for run in runs]


def train_named(specs: dict[str, Run]) -> dict[str, tuple[Run, list[dict]]]:
    """train_runs (communication counted) over named runs: name -> (run, rank 0's records)."""
    records = train_runs(list(specs.values()), count_comms=True)
    return {name: (run, rec) for (name, run), rec in zip(specs.items(), records)}


def read_metrics(run_dir: Path, rank: int | None = None) -> list[dict]:
    name = "metrics.jsonl" if rank is None else f"metrics.rank{rank}.jsonl"
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines() if line.strip()]
