"""The layout of ranks: parallel degrees (meshtrain.degrees) mapped to named DeviceMesh axes, passed
explicitly. Each parallelism asks the Topology for the group of its own axis; none is global.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshtrain.degrees import AXES, Degrees

__all__ = ["AXES", "Degrees", "Topology"]


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
    def build(cls, degrees: Degrees, device: torch.device) -> Topology:
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
            if self._dp_mesh is None:
                raise RuntimeError("Topology has dp > 1 but no flattened dp mesh")
            return self._dp_mesh.get_group()
        return self.mesh.get_group(axis)

    def describe(self) -> str:
        live = [f"{a}={getattr(self.degrees, a)}" for a in AXES if getattr(self.degrees, a) > 1]
        return " x ".join(live) if live else "single process"
