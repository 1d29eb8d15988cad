"""Parameter counts and FLOPs against arithmetic done by hand in the comments."""

from __future__ import annotations

import pytest

from meshtrain.config import ModelConfig
from meshtrain.model.math import (
    ModelShape,
    forward_flops_per_token,
    iteration_flops,
    matmul_params,
    narayanan_flops,
    param_count,
    utilization,
)
from meshtrain.planner import flops_per_token
from meshtrain.planner.presets import MODELS

pytestmark = pytest.mark.pure

TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_dim=0, max_seq_len=128)


def test_tiny_param_count_by_hand() -> None:
    # d=64, head_dim=16, kv dim = 2*16 = 32, ffn = 64*ceil(int(8*64/3)/64) = 64*ceil(170/64) = 192
    # embedding 256*64 = 16384
    # per layer: q 64*64 = 4096, k 64*32 = 2048, v 2048, o 4096            -> 12288
    #            gate 64*192 = 12288, up 12288, down 12288                 -> 36864
    #            two RMSNorm weights 2*64                                  ->   128
    #            one layer = 49280, two layers = 98560
    # final norm 64, untied lm_head 256*64 = 16384
    # total = 16384 + 98560 + 64 + 16384 = 131392
    assert TINY.hidden_dim == 192
    assert param_count(MODELS["tiny"]) == 131392


def test_tied_embeddings_drop_the_head() -> None:
    tied = ModelShape("t", "llama", 2, 64, 4, 2, 192, 256, tie_embeddings=True)
    assert param_count(tied) == 131392 - 256 * 64


def test_llama3_8b_param_count() -> None:
    # embedding and head 2 * 128256*4096 = 1,050,673,152; final norm 4096
    # per layer: q, o 2*4096^2 = 33,554,432; k, v 2*4096*1024 = 8,388,608;
    #            mlp 3*4096*14336 = 176,160,768; norms 8192 -> 218,112,000; x32 = 6,979,584,000
    assert param_count(MODELS["llama3-8b"]) == 8_030_261_248


def test_gpt3_175b_param_count() -> None:
    # per layer 12h^2 + 13h = 1,811,939,328 + 159,744 = 1,812,099,072; x96 = 173,961,510,912
    # token embedding (tied) 50257*12288 = 617,558,016; positions 2048*12288 = 25,165,824
    # final LayerNorm 2*12288 = 24,576 -> 174,604,259,328 ~ 174.6B
    assert param_count(MODELS["gpt3-175b"]) == 174_604_259_328


def test_moe_counts_all_experts_but_activates_top_k() -> None:
    dense = ModelShape("d", "llama", 2, 64, 4, 2, 192, 256)
    moe = ModelShape("m", "llama", 2, 64, 4, 2, 192, 256, n_experts=8, top_k=2, expert_ffn=96)
    # experts replace the 36864-element MLP with 8 * 3*64*96 = 147456 plus a router 64*8 = 512
    assert param_count(moe) == param_count(dense) + 2 * (147456 + 512 - 36864)
    # active matmul weights per layer: attention 12288 + 2 experts * 18432 + router 512
    assert matmul_params(moe) == 2 * (12288 + 36864 + 512) + 256 * 64


def test_flops_per_token_for_tiny() -> None:
    # N (matmul weights) = 2 layers * (12288 + 36864) + lm_head 16384 = 114688; 6N = 688128
    # attention 12*l*h*s = 12*2*64*128 = 196608; total 884736
    assert flops_per_token(TINY, 128) == 884736.0


def test_generic_flops_match_narayanan_closed_form() -> None:
    gpt3 = MODELS["gpt3-175b"]
    tokens = 1536 * 2048
    model, hardware = iteration_flops(gpt3, tokens, 2048, "full")
    assert hardware == pytest.approx(narayanan_flops(1536, 2048, 96, 12288, 50257, full_recompute=True), rel=1e-12)
    assert model == pytest.approx(narayanan_flops(1536, 2048, 96, 12288, 50257, full_recompute=False), rel=1e-12)


def test_selective_recompute_adds_only_attention_scores() -> None:
    gpt3 = MODELS["gpt3-175b"]
    model, hardware = iteration_flops(gpt3, 1, 2048, "selective")
    # one extra forward of QK^T and AV per layer: 4*s*h = 4*2048*12288 per token, 96 layers
    assert hardware - model == pytest.approx(96 * 4 * 2048 * 12288)
    assert forward_flops_per_token(gpt3, 2048) * 3 == pytest.approx(model)


def test_utilization_definition() -> None:
    # 1e15 FLOPs in 1 s on 4 devices of 1e15 peak: a quarter of peak
    assert utilization(1e15, 1.0, 4, 1e15) == 0.25
