"""An independent count of communication: a wrapper around torch.distributed, installed by a test.

meshtrain's own counters (CommStats) record what its communication modules say they send. This
wrapper sits one level lower, on the torch.distributed functions themselves, and counts the tensors
that really reach them, padding and dtype included, in the payload convention of
meshtrain.accounting (all-reduce: the tensor; all-gather: the gathered output; reduce-scatter: the
full input; p2p: what is sent). Scalar bookkeeping (the loss and gradient-norm reductions and the
step-time gather, at most two elements per rank) is kept apart, as the convention leaves it out of
the strategies' volume.

It is a counting wrapper, not a fake: every call goes through to torch unchanged.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SCALAR = 2  # elements: the loss sum, the grad norm's (replicated, sharded) pair


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommCounter:
    """Bytes and calls per collective kind, for every call into the wrapped torch.distributed functions."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.dtypes: dict[str, set[str]] = defaultdict(set)
        self._saved: dict[str, Callable[..., Any]] = {}

    def _count(self, kind: str, tensor: torch.Tensor, each: torch.Tensor | None = None) -> None:
        """`each`: what one rank contributes, when it is not `tensor` (an all-gather's input)."""
        if (tensor if each is None else each).numel() <= SCALAR:
            kind = "scalar"
        self.bytes[kind] += _nbytes(tensor)
        self.calls[kind] += 1
        self.dtypes[kind].add(str(tensor.dtype).removeprefix("torch."))

    def _wrap(self, name: str, count: Callable[..., None]) -> None:
        original = getattr(dist, name)
        self._saved[name] = original

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            count(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(dist, name, wrapper)

    def install(self) -> CommCounter:
        self._wrap("all_reduce", lambda t, *a, **k: self._count("all_reduce", t))
        self._wrap("all_gather_single", lambda out, inp, *a, **k: self._count("all_gather", out, inp))
        self._wrap("reduce_scatter_single", lambda out, inp, *a, **k: self._count("reduce_scatter", inp))
        self._wrap("all_to_all_single", lambda out, inp, *a, **k: self._count("all_to_all", inp))
        self._wrap("broadcast", lambda t, *a, **k: self._count("broadcast", t))

        def p2p(ops: list[dist.P2POp], *a: Any, **k: Any) -> None:
            for op in ops:
                if op.op is dist.distributed_c10d.isend:
                    self._count("p2p", op.tensor)

        self._wrap("batch_isend_irecv", p2p)
        return self

    def uninstall(self) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            "bytes": dict(self.bytes),
            "calls": dict(self.calls),
            "dtypes": {k: sorted(v) for k, v in self.dtypes.items()},
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.snapshot()))


def load_counts(run_dir: Path, rank: int) -> dict[str, Any]:
    return json.loads((run_dir / f"comm_counted.rank{rank}.json").read_text())
