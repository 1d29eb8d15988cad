"""Context parallelism's pieces on one process: the block kernels, the merge rule, the sharding.

The merge rule is checked against softmax over the concatenated keys (written here, not the
module's helper); the math kernel against torch's fused CPU flash op; the shards against a
partition of the sequence.
"""

from __future__ import annotations

import pytest
import torch

from meshtrain.context_parallel import kernels, shard_indices

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
