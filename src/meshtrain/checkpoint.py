"""Atomic, verified, resumable checkpoints through torch.distributed.checkpoint (DCP).

Layout: RUN_DIR/checkpoints/step_00000010/ holds DCP's files, one rng_rankN.pt per rank, meta.json
(step, run id, sampler position, layout), config.toml (the config this run trained with, which
`meshtrain generate` rebuilds the model from) and, written last, COMMITTED: a manifest of every other
file's size and crc32. A folder without COMMITTED is not a checkpoint, whatever its name.

Saving (collective): every rank writes into step_X.tmp; after a barrier rank 0 writes meta.json and
config.toml, fsyncs every file and the folder, writes COMMITTED (fsynced too) and renames the folder
to step_X. Re-saving a step renames the old folder to step_X.old first and removes it only after
the new one is in place, so at every instant one committed copy exists. A crash or a full disk
(ENOSPC) at any point leaves the previous checkpoints intact. Rotation keeps the `keep` newest
committed checkpoints of *this run* (by run id) and never touches another run's or the newest.

Loading: `candidates` lists committed checkpoints newest first; `verify` checks every file's size
and crc32 against the manifest. Every rank checks the same files, so all ranks agree on a corrupt
checkpoint without a collective, and resume falls back to the previous one with a warning.
`check_compatible` compares the checkpoint's tensors with the model's before DCP loads anything.
"""

from __future__ import annotations

import errno
import random
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful

from meshtrain.checkpoint_files import (
    CheckpointError,
    _clear_stale,
    _commit,
    _publish,
    candidates,
    committed,
    latest,
    prune,
    read_meta,
    step_dir,
    verify,
)
from meshtrain.faults import maybe_fail

__all__ = [
    "CheckpointError",
    "Saver",
    "candidates",
    "check_compatible",
    "committed",
    "latest",
    "load",
    "prune",
    "read_meta",
    "step_dir",
    "verify",
]


# ---- saving ---------------------------------------------------------------------------------------
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


class Saver:
    """Writes this run's checkpoints; with `async_save` the files are written in the background and
    committed by the next save or by `finish` (both collective)."""

    def __init__(
        self, root: Path, run_id: str, keep: int, config_toml: str, async_save: bool, barrier: Callable[[], None]
    ) -> None:
        self.root, self.run_id, self.keep, self.config_toml = root, run_id, keep, config_toml
        self.async_save, self.barrier = async_save, barrier
        self.pending: tuple[Any, Path, Path, dict[str, Any]] | None = None
        self.group = dist.new_group(backend="gloo") if async_save else None  # DCP's background writes

    def save(self, step: int, app_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own shards of `app_state`."""
        self.finish()
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        rank = dist.get_rank()
        try:
            if rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                _clear_stale(self.root)
                tmp.mkdir()
            self.barrier()
            maybe_fail("enospc_in_save", step)
            torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
            meta = {**meta, "run_id": self.run_id}
            if self.async_save:
                future = dcp.async_save(app_state, checkpoint_id=tmp, process_group=self.group)
                self.pending = (future, tmp, final, meta)
                return final
            dcp.save(app_state, checkpoint_id=tmp)
        except Exception as exc:
            self._fail(tmp, step, exc)
        maybe_fail("in_save", step)
        self._complete(tmp, final, meta)
        return final

    def finish(self) -> None:
        """Commit an asynchronous save still in flight (collective)."""
        if self.pending is None:
            return
        future, tmp, final, meta = self.pending
        self.pending = None
        try:
            future.result()
        except Exception as exc:
            self._fail(tmp, meta["step"], exc)
        self._complete(tmp, final, meta)

    def _complete(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        self.barrier()  # every rank's files are on disk before the folder is committed
        if dist.get_rank() == 0:
            try:
                _commit(tmp, meta, self.config_toml)
                _publish(tmp, final)
                prune(self.root, self.run_id, self.keep)
            except OSError as exc:
                self._fail(tmp, meta["step"], exc)
        self.barrier()

    def _fail(self, tmp: Path, step: int, exc: BaseException) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = next((p.name for p in candidates(self.root)), None)
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        cause = _os_error(exc)
        what = "no space left on the device" if cause is not None and cause.errno == errno.ENOSPC else str(cause or exc)
        raise CheckpointError(
            f"saving the checkpoint of step {step} under {self.root} failed: {what}; {kept}; "
            "free space or set checkpoint.interval/keep"
        ) from None


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind an exception (DCP wraps a writer's error in its own)."""
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, OSError):
            return e
        seen += [x for x in (e.__cause__, e.__context__) if x is not None]
        seen += [x for x in getattr(e, "failures", {}).values() if isinstance(x, BaseException)]
    return None


# ---- loading --------------------------------------------------------------------------------------
def _flatten(prefix: str, value: Any, out: dict[str, tuple[int, ...]]) -> None:
    if isinstance(value, Stateful):
        value = value.state_dict()
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, item, out)
    elif isinstance(value, torch.Tensor):
        out[prefix] = tuple(value.shape)


def check_compatible(path: Path, app_state: dict[str, Any], sections: Iterable[str] = ("model", "optim")) -> None:
    """One-line CheckpointError unless the checkpoint holds exactly the model's tensors, with the same
    shapes (collective when distributed: the ranks' parts together must cover the checkpoint)."""
    saved = {
        k: tuple(v.size)
        for k, v in dcp.FileSystemReader(path).read_metadata().state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    wanted: dict[str, tuple[int, ...]] = {}
    for section in sections:
        _flatten(section, app_state[section], wanted)
    hint = f"compare {path / 'config.toml'} with this run's config"
    for key, shape in wanted.items():
        if key not in saved:
            raise CheckpointError(f"checkpoint {path.name} has no {key}, which this model has; {hint}")
        if saved[key] != shape:
            raise CheckpointError(
                f"{key} is {list(saved[key])} in checkpoint {path.name} but {list(shape)} in this model; {hint}"
            )
    # a rank holds only its part (pipeline stages): what the checkpoint has beyond every rank's parts is extra
    everyone = set(wanted)
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, sorted(wanted))
        everyone = {key for part in parts for key in part}
    extra = sorted(k for k in saved if k.split(".")[0] in sections and k not in everyone)
    if extra:
        raise CheckpointError(
            f"checkpoint {path.name} has {extra[0]} (and {len(extra) - 1} more) that this model lacks; {hint}"
        )


def load(path: Path, app_state: dict[str, Any], load_rng: bool = True) -> dict[str, Any]:
    """Load in place into the tensors of `app_state`; return the checkpoint's meta.json."""
    check_compatible(path, app_state, [s for s in ("model", "optim") if s in app_state])
    dcp.load(app_state, checkpoint_id=path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    meta = read_meta(path)
    rng_file = path / f"rng_rank{rank}.pt"
    if load_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif load_rng and meta.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1):
        raise CheckpointError(f"{rng_file} is missing from a checkpoint of the same layout; it is incomplete")
    # a checkpoint moved to another number of ranks has no random state for the new ones: training
    # draws none (data order comes from the seeded sampler), so resuming stays exact
    return meta
