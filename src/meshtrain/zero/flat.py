"""Flat parameter units: the layout that ZeRO shards.

A unit's parameters sit end to end in one flat buffer, padded at the end to a multiple of the
shard-group size N, so that every rank owns one equal, contiguous slice (its shard) and the
single-tensor collectives can move it. A parameter may straddle two shards; the part of it inside
this rank's shard is a `Piece`. The optimizer steps pieces named after their parameter, so its state
is keyed by parameter name whatever the unit layout: that is what lets a checkpoint written with one
stage or shard count load into another.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Piece:
    """The elements [param_start, param_start + numel) of a flattened parameter, at `start` in a shard."""

    name: str
    start: int
    param_start: int
    numel: int


class FlatUnit:
    """Where each parameter of a unit lives in the padded flat buffer, and which part this rank owns."""

    def __init__(self, name: str, named: list[tuple[str, nn.Parameter]], world: int, rank: int) -> None:
        if not named:
            raise ValueError(f"flat unit {name} has no parameters")
        self.name = name
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.offsets = list(itertools.accumulate([0] + self.numels[:-1]))
        self.numel = sum(self.numels)
        self.world, self.rank = world, rank
        self.shard_size = -(-self.numel // world)
        self.padded = self.shard_size * world
        self.lo = rank * self.shard_size
        self.pieces = self._pieces()

    def _pieces(self) -> list[Piece]:
        hi = self.lo + self.shard_size
        out = []
        for name, off, n in zip(self.names, self.offsets, self.numels):
            a, b = max(off, self.lo), min(off + n, hi)
            if a < b:
                out.append(Piece(name, a - self.lo, a - off, b - a))
        return out

    @property
    def shard(self) -> slice:
        return slice(self.lo, self.lo + self.shard_size)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's view into a full (padded) flat buffer."""
        return [flat[o:o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes)]

    def piece_views(self, shard: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(parameter name, view) of every piece of a shard-sized tensor; padding belongs to no piece."""
        return [(p.name, shard[p.start:p.start + p.numel]) for p in self.pieces]

    def flatten(self, tensors: list[torch.Tensor | None], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A new padded flat buffer holding `tensors` end to end; None (no gradient) and padding are zeros."""
        out = torch.empty(self.padded, dtype=dtype, device=device)
        views = self.views(out)
        pairs = [(v, t) for v, t in zip(views, tensors) if t is not None]
        if pairs:
            torch._foreach_copy_([v for v, _ in pairs], [t for _, t in pairs])
        for v, t in zip(views, tensors):
            if t is None:
                v.zero_()
        out[self.numel:].zero_()
        return out

    def real_bytes(self, element_size: int) -> int:
        """Unpadded bytes of the whole unit: what its collectives are charged."""
        return self.numel * element_size


def named_unique(modules: list[tuple[str, nn.Module]], seen: set[int]) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters of (prefix, module) pairs not yet in `seen` (tied weights once), with full names."""
    out = []
    for prefix, module in modules:
        for name, p in module.named_parameters(prefix=prefix):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
    return out
