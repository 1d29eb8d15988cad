"""Checkpoint views of sharded ZeRO state, keyed by parameter name so that any layout can load them.

torch.distributed.checkpoint (DCP) treats an object with `state_dict()` and `load_state_dict()` as
Stateful: it saves what `state_dict()` returns, and on load it fills those tensors in place and hands
them back through `load_state_dict()`. Both classes here answer `state_dict()` with full, unsharded
tensors gathered from the shard group, shaped like the parameters, exactly what plain data
parallelism saves. Every rank of the group then holds the same tensors and DCP writes each once. On
load, each rank copies back only the elements of its own shard. A checkpoint therefore moves freely
between ZeRO stages, shard counts and plain DP, at the price of one full copy of the model (and
of the Adam moments, while saving) per rank: fine for the models a CPU trains, and the place to
switch to DTensor-sharded saves for large ones.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from meshtrain.zero.comm import gather_uncounted
from meshtrain.zero.flat import FlatUnit

KINDS = ("exp_avg", "exp_avg_sq")


class ModelState:
    """Stateful: the model's parameters, gathered to full tensors for a save, scattered back on load."""

    def __init__(self, gather: Callable[[], dict[str, torch.Tensor]],
                 scatter: Callable[[dict[str, torch.Tensor]], None]) -> None:
        self._gather, self._scatter = gather, scatter

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._gather()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self._scatter(sd)


class OptimState(dict):
    """The optimizer's own state dict (per-piece moments, 'steps'), which DCP sees, through the
    Stateful methods, as full per-parameter moments. It stays a dict so that AdamW.load_state_dict
    can read the restored step count from it."""

    def __init__(self, local: dict[str, torch.Tensor], units: list[FlatUnit], group: dist.ProcessGroup | None,
                 device: torch.device) -> None:
        super().__init__(local)
        self._units, self._group, self._device = units, group, device

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"steps": self["steps"]}
        for unit in self._units:
            for kind in KINDS:
                shard = torch.zeros(unit.shard_size, dtype=torch.float32, device=self._device)
                for name, view in unit.piece_views(shard):
                    view.copy_(self[f"{kind}.{name}"])
                full = torch.empty(unit.padded, dtype=torch.float32, device=self._device)
                gather_uncounted(full, shard, self._group)
                out.update((f"{kind}.{n}", v.clone()) for n, v in zip(unit.names, unit.views(full)))
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for unit in self._units:
            for piece in unit.pieces:
                for kind in KINDS:
                    flat = sd[f"{kind}.{piece.name}"].reshape(-1)
                    self[f"{kind}.{piece.name}"].copy_(flat[piece.param_start:piece.param_start + piece.numel])
        self["steps"] = sd["steps"]
