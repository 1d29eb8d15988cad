"""Compressed all-gather on real gloo ranks: each rank gets every rank's tensor as the codec decodes
it, and both meshtrain's counters and the wrapper around torch.distributed see exactly the
compressed bytes (payload plus fp32 scales, formulas written here), not the fp32 tensor's."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from comm_counter import CommCounter
from dist_utils import spawn
from meshtrain.accounting import CommStats
from meshtrain.core.comm import all_gather_compressed
from meshtrain.core.quantize import dequantize, quantize, sign_compress, sign_decompress

pytestmark = pytest.mark.dist
N = 1000  # 15 blocks of 64 and one of 40
CASES = {8: 1024 + 16 * 4, 4: 512 + 16 * 4, 1: 128 + 16 * 4}  # bits -> one rank's wire bytes


def _mine(rank: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(rank))


def _decoded(rank: int, bits: int) -> torch.Tensor:
    if bits == 1:
        return sign_decompress(sign_compress(_mine(rank), 64))
    return dequantize(quantize(_mine(rank), bits, 64))


def _worker(rank: int, world: int) -> None:
    for bits, per_rank in CASES.items():
        stats, counter = CommStats(), CommCounter().install()
        try:
            out = all_gather_compressed(_mine(rank), dist.group.WORLD, stats, bits=bits, block=64)
        finally:
            counter.uninstall()
        expected = torch.cat([_decoded(r, bits) for r in range(world)])
        assert torch.equal(out, expected), bits
        assert stats.payload["all_gather"] == world * per_rank, (bits, dict(stats.payload))
        assert sum(counter.bytes.values()) == world * per_rank, (bits, dict(counter.bytes))
        assert stats.wire == pytest.approx(world * per_rank * (world - 1) / world)


def test_compressed_all_gather_decodes_every_rank_and_counts_the_compressed_bytes() -> None:
    spawn(_worker, 2)
