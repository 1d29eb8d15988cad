"""The parallel degrees of a layout and their arithmetic: the one place that knows the axes.

Axes, outermost first: diloco, pp, dp_replicate, dp_shard, cp, tp. Tensor parallelism is innermost
so its chatty collectives stay among neighbouring ranks (one node); pipeline stages come next to the
outside because they only exchange point-to-point activations. Outermost of all are DiLoCo's islands:
each is a complete layout of the other axes, and only the outer step, every few hundred steps,
crosses between them (meshtrain.diloco). Expert parallelism adds no ranks: it borrows the
dp_shard x cp ranks, as in torchtitan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

AXES: tuple[str, ...] = ("diloco", "pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class Degrees:
    """Pure arithmetic over the layout; needs no processes (config, validation, topology and the
    planner all take their degrees from here)."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    diloco: int = 1
    """Islands (the outermost axis); the other degrees describe one island."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    @property
    def island_size(self) -> int:
        return self.world_size // self.diloco

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

    def expert_groups(self) -> dict[str, list[list[int]]]:
        """The expert groups by name, each a list of global-rank lists.

        Expert parallelism borrows the dp_shard x cp ranks: flattened row-major, consecutive runs of
        ep of them form an `ep` group (they hold different experts). The ranks at the same place of
        every run form an `edp_shard` group (same experts, different tokens: ZeRO shards the experts'
        state over it, as it shards the dense state over dp_shard x cp), and with dp_replicate too an
        `edp` group (the experts' gradients are summed over it)."""
        keys = {
            "ep": lambda c, flat: (c["diloco"], c["pp"], c["tp"], c["dp_replicate"], flat // self.ep),
            "edp_shard": lambda c, flat: (c["diloco"], c["pp"], c["tp"], c["dp_replicate"], flat % self.ep),
            "edp": lambda c, flat: (c["diloco"], c["pp"], c["tp"], flat % self.ep),
        }
        out: dict[str, dict[tuple[int, ...], list[int]]] = {name: {} for name in keys}
        for rank in range(self.world_size):
            c = self.coords(rank)
            flat = c["dp_shard"] * self.cp + c["cp"]
            for name, key in keys.items():
                out[name].setdefault(key(c, flat), []).append(rank)
        return {name: list(runs.values()) for name, runs in out.items()}

    def shard_groups_by_node(self, node_size: int) -> dict[str, list[list[int]]]:
        """The dp_shard x cp groups (ZeRO's shard groups) cut along nodes of `node_size` consecutive
        global ranks, by name, each a list of global-rank lists (ZeRO++'s hierarchy):
        `shard_intra`: the members of one shard group on one node; `shard_inter`: the members at the
        same place of every node's share of the group (one rank per node).
        Raises ValueError when a group has unequal shares on the nodes it spans."""
        shard_groups: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world_size):
            c = self.coords(rank)
            shard_groups.setdefault((c["diloco"], c["pp"], c["dp_replicate"], c["tp"]), []).append(rank)
        intra: list[list[int]] = []
        inter: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for key, members in shard_groups.items():
            shares: dict[int, list[int]] = {}
            for rank in members:
                shares.setdefault(rank // node_size, []).append(rank)
            sizes = {len(share) for share in shares.values()}
            if len(sizes) > 1:
                raise ValueError(
                    f"the dp_shard x cp group {members} has {sorted(len(s) for s in shares.values())} ranks "
                    f"on its nodes of {node_size}: a hierarchy needs the same number on each"
                )
            intra.extend(shares.values())
            for share in shares.values():
                for place, rank in enumerate(share):
                    inter.setdefault((key, place), []).append(rank)
        return {"shard_intra": intra, "shard_inter": list(inter.values())}

    def dp_rank(self, rank: int) -> int:
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]
