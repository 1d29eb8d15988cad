"""Process-group start-up and shutdown, for torchrun-style workers and for a lone process.

Nothing here is global: `init_distributed` returns a `DistEnv` that the caller passes on.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    restart: int  # torchelastic restart count: which attempt this is
    store: dist.Store | None = None
    """The rendezvous store, for the hang watchdog (None: no watchdog)."""
    launch_id: str = "local"
    """The same on every rank and every restart of one launch (torchelastic's run id)."""


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _store(rank: int, world_size: int, restart: int, timeout: timedelta) -> dist.Store:
    if "MASTER_ADDR" not in os.environ:
        return dist.HashStore()  # a lone process: no rendezvous needed
    use_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=(rank == 0 and not use_agent),
        timeout=timeout,
        wait_for_workers=False,
    )
    # After an elastic restart, keys of the failed attempt (gloo's peer addresses among them) are
    # still in the agent's store; a fresh prefix per attempt keeps workers from reading stale ones.
    return dist.PrefixStore(f"meshtrain/attempt{restart}", base)


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> DistEnv:
    """Join the process group described by torchrun's environment, or form a group of one."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    dev = pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    store = None
    if not dist.is_initialized():
        store = _store(rank, world_size, restart, timeout)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    watch = dist.PrefixStore("watchdog", store) if store is not None and world_size > 1 else None
    launch = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if launch in ("", "none"):  # torchrun without --rdzv-id: one id for all ranks, from rank 0
        ids = [f"launch-{uuid.uuid4().hex[:12]}" if rank == 0 else ""]
        if world_size > 1:
            dist.broadcast_object_list(ids, src=0)
        launch = ids[0]
    return DistEnv(rank, world_size, local_rank, dev, backend, restart, watch, launch)


def shutdown(hard_exit: bool = False, code: int = 0) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    if hard_exit:
        # gloo's differentiable all_to_all can abort in interpreter teardown; skip the teardown.
        os._exit(code)
