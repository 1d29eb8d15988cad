"""DiLoCo's cross-island traffic: the codecs against the exact mean, and the bytes of whole runs
against formulas written here and against what torch.distributed was handed (tests/comm_counter.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from checks import counted, recorded
from dist_utils import TINY, Run, spawn, train_named
from meshtrain.accounting import CommStats
from meshtrain.config import load_config
from meshtrain.diloco.comm import mean_over_islands
from meshtrain.model import build_model

N, BLOCK = 5000, 512  # not a multiple of the block: the last one is padded


def _tensor(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(N, generator=g) * (1 + rank)


def _codecs(rank: int, world: int) -> None:
    a, b = _tensor(0), _tensor(1)
    exact = (a + b) / 2
    for codec in ("fp32", "bf16", "int8"):
        stats = CommStats()
        got = mean_over_islands(_tensor(rank), dist.group.WORLD, stats, codec, BLOCK)
        if codec == "fp32":
            torch.testing.assert_close(got, exact, rtol=0, atol=1e-6)
            assert stats.payload["all_reduce"] == 4 * N and stats.wire == 4 * N  # 2(K-1)/K = 1 at K = 2
        elif codec == "bf16":
            want = (a.bfloat16() + b.bfloat16()).float() / 2  # rounded once each, summed in bf16
            assert torch.equal(got, want)
            assert stats.payload["all_reduce"] == 2 * N
        else:
            # two rounding steps of at most half a code each; a code is the block's absmax / 127
            bound = 0.5 * (a.abs().max() + b.abs().max()) / 127 + 0.5 * exact.abs().max() / 127
            assert (got - exact).abs().max() <= bound
            assert (got - exact).abs().max() > 0  # it really is quantized
            chunk = math.ceil(N / 2)
            codes = math.ceil(chunk / BLOCK) * (BLOCK + 4)  # int8 codes of whole blocks + an fp32 scale each
            assert stats.payload["all_to_all"] == 2 * codes and stats.payload["all_gather"] == 2 * codes
        mine = torch.empty(2 * N)
        dist.all_gather_into_tensor(mine, got.contiguous())
        assert torch.equal(mine[:N], mine[N:]), codec  # every island applies the same tensor


@pytest.mark.dist
def test_codecs_give_the_mean_within_their_rounding_and_the_same_tensor_everywhere() -> None:
    spawn(_codecs, 2)


STEPS, H = 4, 2
TINY_PARAMS = sum(p.numel() for p in build_model(load_config(TINY, []).model, torch.device("cpu"), 0).parameters())
HALVES = (math.ceil(TINY_PARAMS / 2), TINY_PARAMS - math.ceil(TINY_PARAMS / 2))  # each replica's share


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("diloco-bytes")
    base = [f"training.steps={STEPS}", "parallel.node_size=2"]
    islands = [*base, "parallel.diloco=2", f"diloco.inner_steps={H}"]
    specs = {
        "dp": Run(root / "dp", 4, base),
        "fp32": Run(root / "fp32", 4, islands),
        "int8": Run(root / "int8", 4, [*islands, "diloco.pseudo_grad_dtype=int8", f"diloco.int8_block={BLOCK}"]),
    }
    return train_named(specs)


@pytest.mark.dist
def test_cross_island_bytes_fall_by_h_and_by_four_more_with_int8(runs: dict) -> None:
    """Two islands of 2 ranks = two pseudo-nodes of 2 (node_size 2). DP over all 4: of the ring
    0-1-2-3, ranks 1 and 3 send off-node, 2 x 3/4 of the 4P-byte gradient each, every step. DiLoCo:
    every H steps each rank all-reduces its half of the model with its twin on the other island,
    2 x 1/2 of 2P bytes: 8P over the 4 ranks. So the ratio is 12P x H / 8P = 1.5 H."""
    p = TINY_PARAMS
    dp = sum(recorded(runs["dp"][0], r, "comm_inter_node_bytes") for r in range(4))
    fp32 = sum(recorded(runs["fp32"][0], r, "comm_outer_wire_bytes") for r in range(4))
    int8 = sum(recorded(runs["int8"][0], r, "comm_outer_wire_bytes") for r in range(4))
    assert dp == pytest.approx(12 * p * STEPS, abs=4)
    assert fp32 == pytest.approx(8 * p * STEPS / H, abs=4)
    assert dp / fp32 == pytest.approx(1.5 * H)
    # int8: a rank's half (P/2) is cut into 2 chunks of P/4, sent as int8 codes of whole blocks plus
    # a scale each, once in the all-to-all and once in the all-gather, half of each to the twin
    chunk = math.ceil(math.ceil(p / 2) / 2)
    per_rank = 2 * math.ceil(chunk / BLOCK) * (BLOCK + 4)
    assert int8 == pytest.approx(4 * per_rank * STEPS / H, abs=4)
    assert 3.5 < fp32 / int8 < 4


@pytest.mark.dist
def test_outer_traffic_is_what_torch_was_handed_and_kept_apart_from_the_inner(runs: dict) -> None:
    run = runs["fp32"][0]
    for rank in range(4):
        seen = counted(run, rank)
        inner, outer = recorded(run, rank, "comm_all_reduce_bytes"), recorded(run, rank, "comm_outer_payload_bytes")
        assert outer == 4 * HALVES[rank % 2] * STEPS / H  # its half of the model, per sync
        assert inner + outer == seen["all_reduce"]
        # the in-island all-gather that rebuilds the model from the replicas' halves is inner traffic
        assert recorded(run, rank, "comm_all_gather_bytes") == seen["all_gather"] > 0


@pytest.mark.dist
def test_outer_state_is_two_fp32_copies_of_this_ranks_share(runs: dict) -> None:
    """g and m, for the half of the model each replica of an island keeps."""
    run = runs["fp32"][0]
    for rank in range(4):
        assert recorded(run, rank, "mem_outer_state_bytes") == STEPS * 2 * 4 * HALVES[rank % 2]
