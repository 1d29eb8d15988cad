"""Atomic, resumable checkpoints through torch.distributed.checkpoint (DCP).

Layout: RUN_DIR/checkpoints/step_00000010/ holds DCP's files, meta.json and one rng_rankN.pt per
rank. Every rank writes into step_XXXXXXXX.tmp; only after all ranks finished does rank 0 write
meta.json and rename the folder. A crash mid-save leaves a .tmp folder that `latest` ignores and the
next save removes, so the previous checkpoint always stays intact.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from meshtrain.faults import maybe_fail

PREFIX = "step_"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint (a folder with meta.json, not a .tmp), or None."""
    if not root.is_dir():
        return None
    done = [
        p
        for p in root.iterdir()
        if p.name.startswith(PREFIX) and not p.name.endswith(".tmp") and (p / "meta.json").is_file()
    ]
    return max(done, key=lambda p: int(p.name[len(PREFIX) :]), default=None)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, step: int, app_state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it with its own shards of `app_state`."""
    rank = dist.get_rank()
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        for stale in root.glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(app_state, checkpoint_id=tmp)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    maybe_fail("in_save", step)
    dist.barrier()  # every rank's files are on disk before the folder becomes visible
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(
        (p for p in root.glob(f"{PREFIX}*") if not p.name.endswith(".tmp")), key=lambda p: int(p.name[len(PREFIX) :])
    )
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(path: Path, app_state: dict[str, Any], load_rng: bool = True) -> dict[str, Any]:
    """Load in place into the tensors of `app_state`; return the checkpoint's meta.json."""
    dcp.load(app_state, checkpoint_id=path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = path / f"rng_rank{rank}.pt"
    if load_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "meta.json").read_text())
