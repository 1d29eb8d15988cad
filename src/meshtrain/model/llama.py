"""A Llama-style decoder written for one device.

Parameter names follow Hugging Face's LlamaForCausalLM (`model.layers.0.self_attn.q_proj.weight`, ...),
so import and export are a renaming away. Blocks live in a ModuleDict keyed by their global index:
a pipeline stage that drops blocks keeps the names of the ones it holds, and so does its checkpoint.
Submodules that a stage does not own may be set to None; forward skips them.
Generation may pass a KV cache (meshtrain.model.kv_cache) down to the attention; training never does.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from meshtrain.config import ModelConfig
from meshtrain.model.kv_cache import KVCache, LayerCache, cached_attention
from meshtrain.model.moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast: the mean of squares loses too much in bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF's rotate-half convention, so that imported Llama weights see the same positions.
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal scaled dot-product attention of (b, h, s, d) queries on (b, h_kv, s, d) keys and values."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    attention: AttentionFn
    """The attention core, q, k, v -> out: one device's causal SDPA, or an implementation that spans
    ranks (context parallelism sets it from outside, meshtrain.context_parallel)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.attention = causal_attention
        # Head counts are attributes, not constants: tensor parallelism shrinks them per rank.
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = self.attention(q, k, v)
        elif self.attention is causal_attention:
            out = cached_attention(q, *cache.extend(k, v))
        else:  # an attention core that spans ranks sees a shard of the sequence, not a cached prefix
            raise RuntimeError("the KV cache works with the single-device attention core only")
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    recompute = False
    """Recompute this block's activations in backward instead of saving them (activation
    checkpointing: meshtrain.activation_checkpoint turns it on from outside)."""
    body: Callable[..., torch.Tensor] | None = None
    """The compiled `_forward`, called in its place (meshtrain.compile sets it from outside): the
    block's own hooks and its checkpoint stay outside the compiled region."""

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp: nn.Module = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        # Inside the module call: hooks on the block (ZeRO-3's gather and free) run once around the
        # checkpoint, not again during the recomputation in backward.
        # decoding with a KV cache runs eagerly: one token per call would recompile for every length
        body = self.body if self.body is not None and cache is None else self._forward
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(body, x, cos, sin, cache, use_reentrant=False)
        return body(x, cos, sin, cache)

    def _forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    layers: nn.ModuleDict

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)


class Llama(nn.Module):
    """tokens (b, s) -> logits (b, s, vocab); a stage without the head returns hidden states."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not persistent: derived from the config, so checkpoints stay weights-only.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.tie_embeddings:
            self.tie_embeddings()

    def tie_embeddings(self) -> None:
        """Make the head share the embedding's weight; only a model holding both can tie them."""
        if self.lm_head is None or self.model.embed_tokens is None:
            raise RuntimeError("tie_embeddings needs both the embedding and the lm_head on this model")
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """With a cache, `tokens` follow the cached ones: their positions continue from cache.length,
        their keys and values are added to the cache, and they attend to the cached prefix."""
        h = self.model.embed_tokens(tokens) if self.model.embed_tokens is not None else tokens
        s = h.shape[1]
        if cache is not None:
            if positions is not None:
                raise ValueError("a forward with a KV cache takes its positions from the cache; pass none")
            span = cache.reserve(s)
            if span.stop > len(self.rope_cos):  # a cache made longer than the model's window
                raise ValueError(f"positions up to {span.stop} pass model.max_seq_len = {len(self.rope_cos)}")
            cos, sin = self.rope_cos[span.start : span.stop], self.rope_sin[span.start : span.stop]
        else:
            # Explicit positions: a rank that holds a shard of the sequence (sequence parallelism between
            # regions, context parallelism) cannot infer them from its input; the step runner passes them.
            cos = self.rope_cos[:s] if positions is None else self.rope_cos[positions]
            sin = self.rope_sin[:s] if positions is None else self.rope_sin[positions]
        for name, block in self.model.layers.items():
            h = block(h, cos, sin) if cache is None else block(h, cos, sin, cache.layer(name))
        if cache is not None:
            cache.advance(s)
        if self.model.norm is not None:
            h = self.model.norm(h)
        return self.lm_head(h) if self.lm_head is not None else h

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic per-parameter init keyed by (seed, name): identical full weights on any layout."""
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for name, buf in self.named_buffers():
            if name.endswith("e_score_correction_bias"):  # the MoE balancing bias starts neutral
                buf.zero_()
        for name, param in self.named_parameters():
            param.copy_(init_tensor(name, tuple(param.shape), self.cfg, seed))


def init_tensor(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full initial value of one parameter, computed on CPU from its name alone."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    std = cfg.init_std
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= (2 * cfg.n_layers) ** 0.5  # GPT-2's residual scaling keeps the stream's variance flat
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def count_params(cfg: ModelConfig) -> int:
    """Parameters of the whole single-device model (tied weights once), without allocating it."""
    with torch.device("meta"):
        return sum(p.numel() for p in Llama(cfg).parameters())


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int = 0) -> Llama:
    """Build on the meta device (no memory), then materialise and initialise on `device`."""
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty breaks the tie; restore it before init
        model.tie_embeddings()
    model.init_weights(seed)
    return model
