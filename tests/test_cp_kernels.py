"""Context parallelism's pieces on one process: the block kernels, the merge rule, the sharding.

The merge rule is checked against softmax over the concatenated keys (written here, not the
module's helper); the math kernel against torch's fused CPU flash op; the shards against a
partition of the sequence.
"""

from __future__ import annotations

import pytest
import torch

from meshtrain.context_parallel import kernels, shard_indices
from meshtrain.tools import cp_diagram

pytestmark = pytest.mark.pure


def test_merging_two_blocks_by_lse_equals_attention_over_both() -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    k, v = torch.randn(1, 2, 9, 4, dtype=torch.float64), torch.randn(1, 2, 9, 4, dtype=torch.float64)
    want = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v  # head_dim 4: scale 1/2
    a, b = (
        kernels.block_forward(q, k[:, :, :4], v[:, :, :4], False),
        kernels.block_forward(q, k[:, :, 4:], v[:, :, 4:], False),
    )
    out, lse = kernels.merge(*kernels.merge(None, None, *a), *b)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 2.0, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("zigzag", [True, False])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shards_partition_the_sequence(size: int, zigzag: bool) -> None:
    seq = 48
    shards = [shard_indices(seq, size, r, zigzag) for r in range(size)]
    assert sorted(torch.cat(shards).tolist()) == list(range(seq))
    assert all(len(s) == seq // size for s in shards)
    if zigzag:  # causal work balanced: every rank's positions sum to the same total
        assert len({int(s.sum()) for s in shards}) == 1


def test_the_math_kernel_equals_the_fused_one() -> None:
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, h, 12, 8, dtype=torch.float64) for h in (4, 2, 2))
    dout = torch.randn(2, 4, 12, 8, dtype=torch.float64)
    for causal in (True, False):
        fused = kernels.block_forward(q, k, v, causal)
        math_ = kernels._math_forward(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal)
        torch.testing.assert_close(fused, math_)
        grads = kernels.block_backward(dout, q, k, v, *fused, causal)
        slow = kernels._math_backward(dout, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), *fused, causal)
        torch.testing.assert_close(grads[0], slow[0])
        torch.testing.assert_close(grads[1], kernels._fold(slow[1], 2))


@pytest.mark.parametrize("zigzag", [True, False])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_the_ring_roles_cover_the_causal_matrix_once(size: int, zigzag: bool) -> None:
    """Over all ranks and steps, the blocks the ring's roles compute are the causal lower triangle
    of 2cp x 2cp chunks, each exactly once; rank r holds what shard_indices gives it. Zigzag gives
    every rank 2cp chunk-blocks of work (a diagonal one counts half); contiguous gives rank r 4r + 2."""
    blocks = cp_diagram.ring_blocks(size, zigzag)
    pairs = [(b.q_chunk, b.k_chunk) for b in blocks]
    assert sorted(pairs) == [(q, k) for q in range(2 * size) for k in range(q + 1)]
    seq, c = 16 * size, 8
    for r in range(size):
        held = torch.cat([torch.arange(i * c, (i + 1) * c) for i in cp_diagram.chunks_of(size, r, zigzag)])
        assert torch.equal(held, shard_indices(seq, size, r, zigzag))
    want = [2.0 * size] * size if zigzag else [4.0 * r + 2 for r in range(size)]
    assert cp_diagram.work_per_rank(blocks, size) == want
