"""Parameter counts and FLOPs of the Llama-style (dense or MoE) and GPT-style models.

One source for model arithmetic: the trainer's MFU and the planner's predictions both use it, and
neither imports the other.

FLOP conventions (used everywhere in the planner and documented in docs/planner.md):
* A multiply-add is 2 FLOPs and only matrix multiplies count. Norms, activation functions,
  softmax, rotary embeddings and residual adds are memory-bound and left out, as in Kaplan et al.
  2020 and Narayanan et al. 2021.
* "Matmul parameters" N are the weights that multiply an activation: every projection in the
  blocks plus the output head. The input embedding (a gather), norm weights and biases are not
  in N. With tied embeddings the shared matrix counts once, as the head.
* Attention scores are counted as the full non-causal s x s product, 4*s*d FLOPs per token and
  layer in the forward pass (QK^T and AV). A causal kernel does about half of that, but the
  non-causal figure is what PaLM (appendix B) and Megatron report, so MFU stays comparable.
* Backward costs twice the forward. Recomputation adds forward FLOPs to the hardware count
  (HFU) but never to the model count (MFU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshtrain.config import ConfigError, ModelConfig

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class ModelShape:
    """Architecture numbers the planner needs; `kind` picks Llama (SwiGLU, RMSNorm, no biases)
    or GPT (GeLU MLP, LayerNorm, biases, learned positions)."""

    name: str
    kind: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab: int
    seq_len: int = 2048
    """Default training sequence length; for GPT also the size of the learned position table."""
    tie_embeddings: bool = False
    n_experts: int = 0
    """0 for a dense model; otherwise the experts that replace each block's MLP."""
    top_k: int = 0
    expert_ffn: int = 0
    n_shared_experts: int = 0
    """Shared experts (one SwiGLU n_shared_experts x expert_ffn wide) beside the routed ones."""
    first_dense_layers: int = 0
    """Leading blocks that keep the dense MLP (DeepSeek-V3)."""
    dropout: bool = False
    """Whether activations carry dropout masks (GPT-3 and Megatron's defaults do)."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def dense_layers(self) -> int:
        """Blocks with the dense MLP: all of them, or the first ones of an MoE model."""
        return self.first_dense_layers if self.is_moe else self.n_layers

    def layer_kinds(self) -> list[tuple[bool, int]]:
        """(is an MoE block, how many such blocks)."""
        return [(False, self.dense_layers), (True, self.n_layers - self.dense_layers)]

    def check(self) -> ModelShape:
        """Reject shapes the arithmetic cannot describe, with a one-line reason."""
        for key in ("n_layers", "hidden", "n_heads", "n_kv_heads", "ffn", "vocab", "seq_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model {self.name}: {key}={getattr(self, key)} must be at least 1")
        if self.kind not in ("llama", "gpt"):
            raise ConfigError(f"model {self.name}: kind={self.kind!r} must be llama or gpt")
        if self.hidden % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model {self.name}: hidden={self.hidden} must divide by n_heads={self.n_heads}, "
                f"and n_heads by n_kv_heads={self.n_kv_heads}"
            )
        if self.is_moe and not (1 <= self.top_k <= self.n_experts and self.expert_ffn >= 1):
            raise ConfigError(
                f"model {self.name}: MoE needs 1 <= top_k <= n_experts={self.n_experts} and expert_ffn >= 1"
            )
        return self


def from_model_config(cfg: ModelConfig, seq_len: int | None = None, name: str = "config") -> ModelShape:
    """Our own Llama-style model as configured for a run."""
    return ModelShape(
        name=name,
        kind="llama",
        n_layers=cfg.n_layers,
        hidden=cfg.dim,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        ffn=cfg.hidden_dim,
        vocab=cfg.vocab_size,
        seq_len=seq_len or cfg.max_seq_len,
        tie_embeddings=cfg.tie_embeddings,
        n_experts=cfg.n_experts,
        top_k=cfg.top_k if cfg.n_experts else 0,
        expert_ffn=cfg.moe_ffn_dim if cfg.n_experts else 0,
        n_shared_experts=cfg.n_shared_experts if cfg.n_experts else 0,
        first_dense_layers=cfg.first_dense_layers if cfg.n_experts else 0,
    )


def _mlp_matrices(shape: ModelShape, ffn: int) -> int:
    # SwiGLU has three matrices (gate, up, down); the GeLU MLP has two.
    return (3 if shape.kind == "llama" else 2) * shape.hidden * ffn


def _mlp_biases(shape: ModelShape, ffn: int) -> int:
    return ffn + shape.hidden if shape.kind == "gpt" else 0


def layer_params(shape: ModelShape, moe: bool | None = None) -> dict[str, int]:
    """Exact parameter count of one transformer block, by part: an MoE block when `moe` (default:
    whether the model has experts), else a dense one."""
    d, kv = shape.hidden, shape.kv_dim
    parts = {"attention": 2 * d * d + 2 * d * kv}
    if shape.kind == "gpt":
        parts["attention_bias"] = d + 2 * kv + d
        parts["norms"] = 4 * d  # two LayerNorms, weight and bias each
    else:
        parts["norms"] = 2 * d  # two RMSNorm weights
    if shape.is_moe if moe is None else moe:
        per_expert = _mlp_matrices(shape, shape.expert_ffn) + _mlp_biases(shape, shape.expert_ffn)
        parts["experts"] = shape.n_experts * per_expert
        parts["router"] = d * shape.n_experts
        if shape.n_shared_experts:
            parts["shared_experts"] = _mlp_matrices(shape, shape.n_shared_experts * shape.expert_ffn)
    else:
        parts["mlp"] = _mlp_matrices(shape, shape.ffn)
        if shape.kind == "gpt":
            parts["mlp_bias"] = _mlp_biases(shape, shape.ffn)
    return parts


def param_breakdown(shape: ModelShape) -> dict[str, int]:
    """Exact parameter count of the whole model, by part."""
    d, v = shape.hidden, shape.vocab
    parts = {"embedding": v * d}
    if shape.kind == "gpt":
        parts["positions"] = shape.seq_len * d
    parts["blocks"] = sum(n * sum(layer_params(shape, moe).values()) for moe, n in shape.layer_kinds())
    parts["final_norm"] = 2 * d if shape.kind == "gpt" else d
    parts["lm_head"] = 0 if shape.tie_embeddings else v * d
    return parts


def param_count(shape: ModelShape) -> int:
    return sum(param_breakdown(shape).values())


def active_layer_matmul_params(shape: ModelShape, moe: bool | None = None) -> int:
    """Matrix weights one token passes through in a block (for MoE: top_k experts, the shared ones
    and the router); `moe` as in layer_params."""
    attn = 2 * shape.hidden * shape.hidden + 2 * shape.hidden * shape.kv_dim
    if shape.is_moe if moe is None else moe:
        routed = shape.top_k * _mlp_matrices(shape, shape.expert_ffn) + shape.hidden * shape.n_experts
        return attn + routed + _mlp_matrices(shape, shape.n_shared_experts * shape.expert_ffn)
    return attn + _mlp_matrices(shape, shape.ffn)


def matmul_params(shape: ModelShape) -> int:
    """N of the 6N rule: active block matrices plus the output head (see the module docstring)."""
    blocks = sum(n * active_layer_matmul_params(shape, moe) for moe, n in shape.layer_kinds())
    return blocks + shape.vocab * shape.hidden


def layer_forward_flops_per_token(shape: ModelShape, seq_len: int, moe: bool | None = None) -> float:
    """Forward FLOPs of one block for one token: its matrices plus non-causal attention scores."""
    return 2.0 * active_layer_matmul_params(shape, moe) + 4.0 * seq_len * shape.hidden


def blocks_forward_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Forward FLOPs of all blocks (dense and MoE) for one token."""
    return sum(n * layer_forward_flops_per_token(shape, seq_len, moe) for moe, n in shape.layer_kinds())


def attention_core_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Forward FLOPs of QK^T and AV for one token in one block (what selective recompute redoes)."""
    return 4.0 * seq_len * shape.hidden


def forward_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    return blocks_forward_flops_per_token(shape, seq_len) + 2.0 * shape.vocab * shape.hidden


def shape_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) = 6N + 12*l*h*s, h = n_heads*head_dim."""
    return 3.0 * forward_flops_per_token(shape, seq_len)


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token for our Llama-style model: 6N + 12*l*h*s.

    N counts matmul weights (blocks and lm_head; not the embedding gather, norms or biases) and
    the attention term uses the non-causal convention; see the module docstring. The training
    loop divides tokens/s times this by the peak to report MFU.
    """
    return shape_flops_per_token(from_model_config(model_cfg, seq_len), seq_len)


def iteration_flops(shape: ModelShape, tokens: float, seq_len: int, recompute: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one training iteration over `tokens` tokens.

    Hardware FLOPs add the recomputed forward: the whole blocks for full recompute, only the
    attention scores for selective recompute (Korthikanti et al. 2022); the head is never redone.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ConfigError(f"recompute={recompute!r} must be one of {', '.join(RECOMPUTE_MODES)}")
    model = shape_flops_per_token(shape, seq_len) * tokens
    if recompute == "full":
        extra = blocks_forward_flops_per_token(shape, seq_len)
    elif recompute == "selective":
        extra = shape.n_layers * attention_core_flops_per_token(shape, seq_len)
    else:
        extra = 0.0
    return model, model + extra * tokens


def narayanan_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int, full_recompute: bool) -> float:
    """Closed form for a GPT iteration (Narayanan et al. 2021, eq. 3; Korthikanti et al. 2022).

    With full recompute: 96*B*s*l*h^2 * (1 + s/(6h) + V/(16*l*h)); without it the block terms
    are 3/4 of that: 72*B*s*l*h^2 * (1 + s/(6h) + V/(12*l*h)).
    """
    b, s, l, h, v = batch, seq, layers, hidden, vocab  # noqa: E741 - the paper's symbols
    if full_recompute:
        return 96.0 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    return 72.0 * b * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))


def utilization(flops_per_step: float, step_seconds: float, n_devices: int, peak_flops: float) -> float:
    """Achieved fraction of peak: MFU with model FLOPs, HFU with hardware FLOPs."""
    if step_seconds <= 0 or n_devices < 1 or peak_flops <= 0:
        return math.nan
    return flops_per_step / (step_seconds * n_devices * peak_flops)
