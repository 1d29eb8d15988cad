"""Pure tests of the single-device model: naming, deterministic init, attention, recomputation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meshtrain.activation_checkpoint import apply_activation_checkpointing
from meshtrain.config import ModelConfig
from meshtrain.model import build_model
from meshtrain.model.llama import apply_rope
from meshtrain.tools.tp_measure import saved_bytes_per_block

pytestmark = pytest.mark.pure

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)


def test_parameter_names_follow_hugging_face_llama() -> None:
    names = {n for n, _ in build_model(CFG).named_parameters()}
    for expected in (
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert expected in names


def test_parameter_count_by_hand() -> None:
    # embed 256*64 + head 64*256 + final norm 64 + 2 layers * (q 64*64 + k,v 2*64*32 + o 64*64
    # + gate/up/down 3*64*192 (ffn = 64*ceil(170/64) = 192) + 2 norms * 64)
    per_layer = 4096 + 2 * 2048 + 4096 + 3 * 64 * 192 + 128
    expected = 256 * 64 * 2 + 64 + 2 * per_layer
    assert sum(p.numel() for p in build_model(CFG).parameters()) == expected


def test_init_is_deterministic_and_independent_of_build_order() -> None:
    a, b = build_model(CFG, seed=3), build_model(CFG, seed=3)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    c = build_model(CFG, seed=4)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tied_embeddings_share_one_tensor() -> None:
    m = build_model(ModelConfig(**{**CFG.__dict__, "tie_embeddings": True}))
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_grouped_query_attention_equals_repeated_kv_heads() -> None:
    m = build_model(CFG, seed=1)
    attn = m.model.layers["0"].self_attn
    x = torch.randn(2, 16, 64)
    cos, sin = m.rope_cos[:16], m.rope_sin[:16]
    q = apply_rope(attn.q_proj(x).view(2, 16, 4, 16).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(2, 16, 2, 16).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(2, 16, 2, 16).transpose(1, 2)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 16, 64)
    torch.testing.assert_close(attn(x, cos, sin), attn.o_proj(ref))


def test_causality_future_tokens_do_not_change_the_past() -> None:
    m = build_model(CFG, seed=1)
    x = torch.randint(0, 256, (1, 20))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    torch.testing.assert_close(m(x)[0, :10], m(y)[0, :10])


def test_activation_checkpointing_keeps_names_and_gradients() -> None:
    ref, ac = build_model(CFG, seed=2), build_model(CFG, seed=2)
    assert apply_activation_checkpointing(ac.model.layers, "full", 1) == 2
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ac.named_parameters()]
    x = torch.randint(0, 256, (2, 16))
    for model in (ref, ac):
        model(x).float().logsumexp(-1).mean().backward()
    for p, q in zip(ref.parameters(), ac.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def block_saved_bytes_per_token(cfg: ModelConfig, act: int = 4) -> int:
    """What one Llama block saves for backward per token, term by term (Korthikanti et al. 2022's
    sbh(34 + 5as/h), adjusted: no dropout, SDPA keeps a fp32 log-sum-exp instead of the s x s
    scores, GQA's narrower k and v, SwiGLU's four ffn-wide tensors, unfused RMSNorm's input and
    normalised copy plus a fp32 rsqrt per token)."""
    d, kv, f = cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    norms = 2 * (2 * d * act + 4)
    attention = d * act + (d + kv) * act + kv * act + d * act + cfg.n_heads * 4  # input, q k, v, output, lse
    mlp = d * act + 4 * f * act  # input; gate, silu(gate), up, their product
    return norms + attention + mlp


@pytest.mark.parametrize("every", [0, 1, 2, 3])
def test_activation_checkpointing_saves_only_the_chosen_blocks_inputs(every: int) -> None:
    """Measured with saved-tensor hooks: a recomputed block keeps its input (b*s*h*4 bytes) and
    nothing else; the others save what the formula says; every `every`-th block is chosen."""
    cfg = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)
    b, s = 2, 32
    model = build_model(cfg, seed=1)
    chosen = apply_activation_checkpointing(model.model.layers, "full" if every else "none", max(every, 1))
    assert chosen == (len(range(0, 4, every)) if every else 0)
    x = torch.randint(0, 256, (b, s))
    per_block = saved_bytes_per_block(model, model.model.layers, lambda: model(x, torch.arange(s)))
    for i in range(1, 4):  # block 0 also holds the rope tables, which every block shares
        recomputed = every and i % every == 0
        assert per_block[str(i)] == (b * s * cfg.dim * 4 if recomputed else b * s * block_saved_bytes_per_token(cfg))
