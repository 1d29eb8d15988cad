"""Pure tests of the layout arithmetic (no processes)."""

from __future__ import annotations

import itertools

import pytest
import torch

from meshtrain.topology import AXES, Degrees

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("shape", [(1, 1, 4, 1, 1), (2, 1, 2, 1, 2), (2, 2, 1, 2, 1), (1, 2, 2, 1, 2)])
def test_coords_follow_device_mesh_row_major_order(shape: tuple[int, ...]) -> None:
    d = Degrees(*shape)
    mesh = torch.arange(d.world_size).view(shape)  # the rank layout DeviceMesh builds
    for index in itertools.product(*(range(s) for s in shape)):
        rank = int(mesh[index])
        assert tuple(d.coords(rank)[a] for a in AXES) == index


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
