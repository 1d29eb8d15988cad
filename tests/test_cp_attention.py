"""Context-parallel attention against one device's causal SDPA, on real gloo ranks (cp = 2 and 4).

Every rank draws the same full q, k, v (grouped-query: 8 query heads, 4 kv heads), keeps its shard
of the sequence (contiguous, or zigzag: chunks r and 2cp-1-r), runs ring or Ulysses attention, and
compares its part of the output and of the q, k, v gradients with full causal SDPA's, in fp64
(to 1e-12) and fp32. The number of point-to-point exchanges and all-to-alls is counted by a wrapper
around torch.distributed, against the schedule: cp - 1 forward, (cp - 1) + cp backward for the ring,
4 + 4 all-to-alls for Ulysses.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from comm_counter import CommCounter
from dist_utils import spawn
from meshtrain.accounting import CommStats
from meshtrain.config import ModelConfig
from meshtrain.context_parallel import ContextParallel, apply_context_parallel, shard_indices
from meshtrain.model import build_model
from meshtrain.tools.tp_measure import saved_bytes_per_block
from test_model import block_saved_bytes_per_token

pytestmark = pytest.mark.dist
B, H, HKV, S, D = 2, 8, 4, 32, 8


def _reference(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, dtype=dtype, requires_grad=True) for h in (H, HKV, HKV))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    return q, k, v, out.detach(), grad, q.grad, k.grad, v.grad


def _check(rank: int, world: int, mode: str, zigzag: bool, dtype: torch.dtype) -> None:
    q, k, v, out, grad, gq, gk, gv = _reference(dtype)
    idx = shard_indices(S, world, rank, zigzag and mode == "ring")
    cp = ContextParallel(dist.group.WORLD, world, rank, mode, zigzag and mode == "ring", CommStats())
    leaves = [t.detach()[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
    counter = CommCounter().install()
    mine = cp.attention(*leaves)
    forward = dict(counter.calls)
    mine.backward(grad[:, :, idx])
    counter.uninstall()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    name = f"{mode} zigzag={zigzag} cp={world} {dtype}"
    torch.testing.assert_close(mine.detach(), out[:, :, idx], **tol, msg=lambda m: f"{name} out: {m}")
    for leaf, want, what in zip(leaves, (gq, gk, gv), "qkv"):
        torch.testing.assert_close(leaf.grad, want[:, :, idx], **tol, msg=lambda m: f"{name} d{what}: {m}")
    if mode == "ring":
        assert forward == {"p2p": world - 1} and counter.calls["p2p"] == (world - 1) + (world - 1) + world, name
    else:
        assert forward == {"all_to_all": 4} and counter.calls["all_to_all"] == 8, name


def _all(rank: int, world: int) -> None:
    for dtype in (torch.float64, torch.float32):
        for mode, zigzag in (("ring", True), ("ring", False), ("ulysses", False)):
            if mode == "ulysses" and (H % world or HKV % world):
                continue
            _check(rank, world, mode, zigzag, dtype)


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_attention_matches_one_device(world: int) -> None:
    spawn(_all, world)


def _check_activations(rank: int, world: int) -> None:
    """Saved for backward by one block on a cp rank, measured with saved-tensor hooks: one device's
    bytes per token (test_model.py's formula) for this rank's S/cp tokens. The ring saves its
    queries, keys, values, output and LSE, as SDPA does; Ulysses' SDPA saves the head-sharded
    tensors of the whole sequence, the same bytes, plus its output before the all-to-all back
    (the o_proj input is the one after it)."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256, max_seq_len=64)
    tokens = torch.randint(0, cfg.vocab_size, (B, S))
    for mode, zigzag in (("ring", True), ("ring", False), ("ulysses", False)):
        model = build_model(cfg, seed=1)
        apply_context_parallel([model], dist.group.WORLD, mode, "zigzag" if zigzag else "contiguous", CommStats())
        idx = shard_indices(S, world, rank, zigzag)
        per_block = saved_bytes_per_block(model, model.model.layers, lambda: model(tokens[:, idx], idx))
        want = B * S // world * block_saved_bytes_per_token(cfg) + (
            B * S // world * cfg.dim * 4 if mode == "ulysses" else 0
        )
        assert per_block["1"] == want, (mode, zigzag, per_block, want)


def test_a_cp_rank_saves_one_cpth_of_the_activations() -> None:
    spawn(_check_activations, 2)
