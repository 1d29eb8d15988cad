"""The layout of ranks: parallel degrees (meshtrain.degrees) mapped to named DeviceMesh axes, passed
explicitly. Each parallelism asks the Topology for the group of its own axis; none is global.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshtrain.degrees import AXES, Degrees

__all__ = ["AXES", "Degrees", "Topology"]


# Groups spanning several axes, flattened from the mesh: the batch is split over dp; gradients are
# summed over dp x cp (cp ranks hold the same weights); ZeRO shards over dp_shard x cp (torchtitan's
# dp_shard_cp: CP is folded into the parameter sharding even without data parallelism). None of them
# includes the diloco axis, so every inner group stays inside one island; `island` is all of one.
FLATTENED: dict[str, tuple[str, ...]] = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "island": AXES[1:],
}

# The groups of ranks that hold the same experts (meshtrain.degrees.Degrees.expert_groups), not mesh
# axes: 1/ep of the flattened group each is cut from, as the ep group takes ep of the dp_shard x cp ranks.
SAME_EXPERTS: dict[str, str] = {"edp_shard": "dp_shard_cp", "edp": "dp_cp"}

# ZeRO's shard group cut by node (meshtrain.degrees.Degrees.shard_groups_by_node): made on first request.
BY_NODE = ("shard_intra", "shard_inter")


def resolve_node_size(configured: int) -> int:
    """Ranks per (pseudo-)node: parallel.node_size, or when 0 the local world size torchrun sets."""
    return configured or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or dist.get_world_size()


class Topology:
    """Degrees plus the live DeviceMesh. Each parallelism asks it for the group of its own axis."""

    def __init__(
        self, degrees: Degrees, mesh: DeviceMesh, node_size: int = 0, joined: tuple[int, int] | None = None
    ) -> None:
        """`joined`: (this launch's island, the run's islands) when each DiLoCo island is its own launch
        (diloco.join); otherwise the islands are the mesh's diloco axis."""
        self.degrees = degrees
        self.mesh = mesh
        self.node_size = resolve_node_size(node_size)
        self._by_node: dict[str, dist.ProcessGroup | None] = {}
        self.rank = dist.get_rank()
        self.coords = degrees.coords(self.rank)
        self.island, self.islands = joined if joined is not None else (self.coords["diloco"], degrees.diloco)
        self._flat = {
            name: mesh[axes]._flatten(name)
            for name, axes in FLATTENED.items()
            if self.size(name) > 1 and not (name == "island" and degrees.diloco == 1)
        }
        self._expert: dict[str, dist.ProcessGroup | None] = dict.fromkeys(("ep", *SAME_EXPERTS))
        if degrees.ep > 1:  # not mesh axes: ep borrows dp_shard x cp ranks (degrees.Degrees.expert_groups)
            made: dict[str, list[list[int]]] = {}
            for name, enumeration in degrees.expert_groups().items():
                twin = next((other for other, ranks in made.items() if ranks == enumeration), None)
                if twin is not None:  # without dp_replicate, edp_shard is edp: one group serves both
                    self._expert[name] = self._expert[twin]
                    continue
                self._expert[name], _ = dist.new_subgroups_by_enumeration(enumeration)
                made[name] = enumeration

    @classmethod
    def build(
        cls, degrees: Degrees, device: torch.device, node_size: int = 0, joined: tuple[int, int] | None = None
    ) -> Topology:
        if degrees.world_size != dist.get_world_size():
            raise ValueError(f"layout {degrees.shape} needs {degrees.world_size} ranks, have {dist.get_world_size()}")
        mesh = init_device_mesh(device.type, degrees.shape, mesh_dim_names=AXES)
        return cls(degrees, mesh, node_size, joined)

    def size(self, axis: str) -> int:
        if axis in BY_NODE:
            return len(self._node_enumeration(axis)[0])
        if axis in SAME_EXPERTS:
            return self.size(SAME_EXPERTS[axis]) // self.degrees.ep
        axes = FLATTENED.get(axis, (axis,))
        return math.prod(getattr(self.degrees, a) for a in axes)

    def local_rank(self, axis: str) -> int:
        """This rank's index along `axis` (a flattened group: row-major over its axes)."""
        index = 0
        for a in FLATTENED.get(axis, (axis,)):
            index = index * getattr(self.degrees, a) + self.coords[a]
        return index

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """The process group along `axis` (or a FLATTENED name), or None when that size is 1."""
        if self.size(axis) == 1 or (axis == "island" and self.degrees.diloco == 1):
            return None  # one island is the world: the default group serves
        if axis in FLATTENED:
            return self._flat[axis].get_group()
        if axis in self._expert:
            return self._expert[axis]
        if axis in BY_NODE:
            return self._node_group(axis)
        return self.mesh.get_group(axis)

    def _node_enumeration(self, axis: str) -> list[list[int]]:
        return self.degrees.shard_groups_by_node(self.node_size)[axis]

    def _node_group(self, axis: str) -> dist.ProcessGroup | None:
        # Made on first request, not at start-up: only ZeRO++ asks, and every rank asks in the same
        # order because every rank runs the same build path.
        if axis not in self._by_node:
            self._by_node[axis], _ = dist.new_subgroups_by_enumeration(self._node_enumeration(axis))
        return self._by_node[axis]

    def data_rank(self) -> tuple[int, int]:
        """(index, count) of this rank's share of the global batch: its island's dp ranks, island after island."""
        return self.island * self.size("dp") + self.local_rank("dp"), self.islands * self.size("dp")

    def describe(self) -> str:
        live = [f"{a}={getattr(self.degrees, a)}" for a in AXES if getattr(self.degrees, a) > 1]
        return " x ".join(live) if live else "single process"
