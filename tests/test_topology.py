"""Pure tests of the layout arithmetic (no processes)."""

from __future__ import annotations

import itertools

import pytest
import torch

from meshtrain.accounting import inter_node_factor
from meshtrain.topology import AXES, Degrees

pytestmark = pytest.mark.pure


@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 4, 1, 1), (1, 2, 1, 2, 1, 2), (1, 2, 2, 1, 2, 1), (1, 1, 2, 2, 1, 2), (2, 2, 1, 2, 1, 1)]
)
def test_coords_follow_device_mesh_row_major_order(shape: tuple[int, ...]) -> None:
    """shape: the mesh in AXES order, DiLoCo's islands outermost."""
    d = Degrees(*shape[1:], diloco=shape[0])
    mesh = torch.arange(d.world_size).view(shape)  # the rank layout DeviceMesh builds
    for index in itertools.product(*(range(s) for s in shape)):
        rank = int(mesh[index])
        assert tuple(d.coords(rank)[a] for a in AXES) == index


def test_islands_are_blocks_of_consecutive_ranks_and_inner_groups_stay_inside() -> None:
    """parallel.diloco = 2 islands of dp_shard 2 x tp 2: island k is ranks 4k .. 4k+3, and every
    expert and node-cut shard group lies inside one island."""
    d = Degrees(dp_shard=2, tp=2, ep=2, diloco=2)
    assert d.world_size == 8 and d.island_size == 4
    assert [d.coords(r)["diloco"] for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    groups = list(d.expert_groups().values()) + list(d.shard_groups_by_node(2).values())
    for group in itertools.chain.from_iterable(groups):
        assert len({r // 4 for r in group}) == 1, group


def test_dp_rank_spans_replicate_and_shard() -> None:
    d = Degrees(dp_replicate=2, dp_shard=2, tp=2)
    assert d.dp == 4 and d.world_size == 8
    dp_ranks = sorted({d.dp_rank(r) for r in range(8)})
    assert dp_ranks == [0, 1, 2, 3]
    # tp neighbours share a dp rank: they must see the same batch
    assert d.dp_rank(0) == d.dp_rank(1)


def test_expert_groups_cut_dp_shard_x_cp_into_ep_runs() -> None:
    """dp_replicate 2 x dp_shard 2 x cp 2 = ranks 0..7 (cp innermost), ep 2: the ep groups are
    consecutive pairs; edp_shard pairs each rank with the one holding the same experts in its
    replica (ZeRO shards the experts over it); edp adds the other replica's (gradients are summed)."""
    groups = Degrees(dp_replicate=2, dp_shard=2, cp=2, ep=2).expert_groups()
    assert groups["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["edp_shard"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["edp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_shard_groups_cut_by_node_give_places_and_peers_across_nodes() -> None:
    """ZeRO++'s hierarchy over dp_shard x cp: the members on one node, and one rank per node at the
    same place; tp ranks stay in their own groups."""
    assert Degrees(dp_shard=4).shard_groups_by_node(2) == {
        "shard_intra": [[0, 1], [2, 3]],
        "shard_inter": [[0, 2], [1, 3]],
    }
    by_node = Degrees(dp_shard=2, cp=2, tp=2).shard_groups_by_node(4)  # groups {0,2,4,6} and {1,3,5,7}
    assert by_node == {"shard_intra": [[0, 2], [4, 6], [1, 3], [5, 7]], "shard_inter": [[0, 4], [2, 6], [1, 5], [3, 7]]}
    with pytest.raises(ValueError, match="has \\[1, 2\\] ranks on its nodes of 2"):
        Degrees(dp_shard=3).shard_groups_by_node(2)


def test_inter_node_bytes_follow_the_ring_and_the_all_to_all() -> None:
    """Nodes of 2 over ranks 0-3: in the ring 0-1-2-3 only ranks 1 and 3 send off their node, each
    (n-1)/n of the payload (twice that for an all-reduce); an all-to-all sends half of it away."""
    ring = (0, 1, 2, 3)
    assert [inter_node_factor("all_gather", ring, r, 2) for r in ring] == [0, 0.75, 0, 0.75]
    assert [inter_node_factor("all_reduce", ring, r, 2) for r in ring] == [0, 1.5, 0, 1.5]
    assert [inter_node_factor("all_to_all", ring, r, 2) for r in ring] == [0.5] * 4
    assert inter_node_factor("all_to_all", (0, 1), 0, 2) == 0  # inside one node
    assert inter_node_factor("p2p", (1, 2), 1, 2) == 1 and inter_node_factor("p2p", (0, 1), 0, 2) == 0
    assert inter_node_factor("all_gather", ring, 1, 4) == 0  # one node of 4
