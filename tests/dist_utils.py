"""Run a function on N real gloo processes (for layer-level tests that need no CLI)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., None], world: int, store_path: str, args: tuple[Any, ...]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    fn(rank, world, *args)  # an exception propagates to mp.spawn, which reports it in the parent
    dist.destroy_process_group()
    # gloo can abort in interpreter teardown ("terminate called without an active exception");
    # the work is done and checked, so skip the teardown.
    os._exit(0)


def spawn(fn: Callable[..., None], world: int, *args: Any) -> None:
    """fn(rank, world, *args) on `world` processes; an exception on any rank fails the caller."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world, os.path.join(tmp, "store"), args), nprocs=world, join=True)
