"""The layout of ranks: parallel degrees mapped to named DeviceMesh axes, passed explicitly.

Axes, outermost first: pp, dp_replicate, dp_shard, cp, tp. Tensor parallelism is innermost so its
chatty collectives stay among neighbouring ranks (one node); pipeline stages are outermost because
they only exchange point-to-point activations. Expert parallelism adds no ranks: it borrows the
dp_shard x cp ranks, as in torchtitan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshtrain.config import ParallelConfig

AXES: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class Degrees:
    """Pure arithmetic over the layout; needs no processes (the tests and the planner use it)."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1

    @classmethod
    def from_config(cls, p: ParallelConfig) -> "Degrees":
        if p.dp_shard < 1:
            raise ValueError("resolve parallel.dp_shard (meshtrain.validate.validate) before building a topology")
        return cls(p.pp, p.dp_replicate, p.dp_shard, p.cp, p.tp, p.ep)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each axis (row-major, the same order DeviceMesh uses)."""
        out: dict[str, int] = {}
        for axis, size in zip(reversed(AXES), reversed(self.shape)):
            out[axis] = rank % size
            rank //= size
        return {a: out[a] for a in AXES}

    def dp_rank(self, rank: int) -> int:
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]


class Topology:
    """Degrees plus the live DeviceMesh. Each parallelism asks it for the group of its own axis."""

    def __init__(self, degrees: Degrees, mesh: DeviceMesh) -> None:
        self.degrees = degrees
        self.mesh = mesh
        self.rank = dist.get_rank()
        self.coords = degrees.coords(self.rank)
        # One group spanning both DP axes: batches are split over it, and plain DP reduces over it.
        self._dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp") if degrees.dp > 1 else None

    @classmethod
    def build(cls, degrees: Degrees, device: torch.device) -> "Topology":
        if degrees.world_size != dist.get_world_size():
            raise ValueError(f"layout {degrees.shape} needs {degrees.world_size} ranks, have {dist.get_world_size()}")
        mesh = init_device_mesh(device.type, degrees.shape, mesh_dim_names=AXES)
        return cls(degrees, mesh)

    def size(self, axis: str) -> int:
        return self.degrees.dp if axis == "dp" else getattr(self.degrees, axis)

    def local_rank(self, axis: str) -> int:
        return self.degrees.dp_rank(self.rank) if axis == "dp" else self.coords[axis]

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """The process group along `axis` ('dp' = both DP axes), or None when that degree is 1."""
        if self.size(axis) == 1:
            return None
        if axis == "dp":
            return self._dp_mesh.get_group()
        return self.mesh.get_group(axis)

    def describe(self) -> str:
        live = [f"{a}={getattr(self.degrees, a)}" for a in AXES if getattr(self.degrees, a) > 1]
        return " x ".join(live) if live else "single process"
