"""Byte accounting for memory and communication, reported per rank per step.

Communication convention (shared with the planner, meshtrain.planner.predict_run):
- payload bytes: all_reduce counts the tensor reduced; reduce_scatter the full (unsharded) input;
  all_gather the full (gathered) output; p2p the tensor sent.
- wire bytes: what a ring algorithm makes each rank send: 2(n-1)/n of the payload for all_reduce,
  (n-1)/n for reduce_scatter, all_gather and all_to_all, all of it for p2p.
Scalar bookkeeping reductions (the logged loss, the grad norm) are not counted: they are not part of
any strategy's theoretical volume.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "p2p", "broadcast")


def wire_factor(kind: str, n: int) -> float:
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n
    if kind in ("reduce_scatter", "all_gather", "all_to_all", "broadcast"):
        return (n - 1) / n
    return 1.0


class CommStats:
    """Counts the bytes this rank hands to collectives; one instance per run, passed explicitly."""

    def __init__(self) -> None:
        # float: HSDP's all_reduce records each rank's 1/N share of a unit, which need not be whole
        self.payload: dict[str, float] = defaultdict(int)
        self.wire = 0.0

    def record(self, kind: str, nbytes: float, group_size: int) -> None:
        self.payload[kind] += nbytes
        self.wire += nbytes * wire_factor(kind, group_size)

    def snapshot_and_reset(self) -> dict[str, float]:
        out: dict[str, float] = {f"comm_{k}_bytes": self.payload.get(k, 0) for k in KINDS}
        out["comm_wire_bytes"] = round(self.wire)
        self.payload.clear()
        self.wire = 0.0
        return out


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by distinct storages (views and tied weights counted once); None entries hold nothing."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
