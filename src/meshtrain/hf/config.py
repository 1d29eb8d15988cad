"""config.json of a LlamaForCausalLM (or a MixtralForCausalLM) <-> the model section of our Config.

Read: every field that changes the computation must be one we implement, or the import is refused
with the field's name (rope scaling, biases, another activation, a head_dim that is not
hidden/heads, sliding windows, ...). Both transformers' layouts of the rotary settings are read:
`rope_theta` with `rope_scaling` (4.x) and `rope_parameters` (5.x). Write: the same fields, with
the rotary base in both layouts, so that transformers 4.x and 5.x load it alike.

A mixture-of-experts model is Mixtral when its router is: softmax scores, top-k renormalised, no
shared experts, no leading dense blocks, no capacity dropping and no balancing bias (which changes
the choice). Anything else has no Hugging Face architecture with our attention, and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meshtrain.config import ConfigError, ModelConfig

PREFIX = "hf:"
# config.json key -> ModelConfig field, for everything the two share
FIELDS = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "vocab_size": "vocab_size",
    "intermediate_size": "ffn_dim",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
}
# keys whose value must be exactly this for our model to compute what transformers' does
REQUIRED: dict[str, dict[str, Any]] = {
    "llama": {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
    "mixtral": {"hidden_act": "silu", "sliding_window": None, "router_jitter_noise": 0.0},
}
MOE_FIELDS = {"num_local_experts": "n_experts", "num_experts_per_tok": "top_k", "intermediate_size": "expert_ffn_dim"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}


def hf_dir(init_from: str) -> Path:
    """The folder named by model.init_from = "hf:DIR"."""
    if not init_from.startswith(PREFIX):
        raise ConfigError(f"model.init_from={init_from!r}: write hf:DIR, DIR a Hugging Face model folder")
    return Path(init_from[len(PREFIX) :])


def read_hf_config(directory: Path) -> dict[str, Any]:
    """The ModelConfig fields of DIR/config.json (a LlamaForCausalLM); ConfigError for anything else."""
    path = directory / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.init_from: {path} does not exist; point it at a save_pretrained folder")
    hf = json.loads(path.read_text())
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise ConfigError(
            f"{path}: model_type={kind!r} is not supported; meshtrain imports {' and '.join(ARCHITECTURES.values())}"
        )
    for key, want in REQUIRED[kind].items():
        if key in hf and hf[key] != want:
            raise ConfigError(f"{path}: {key}={hf[key]!r} is not supported (meshtrain's Llama needs {want!r})")
    missing = [k for k in FIELDS if k not in hf and k != "tie_word_embeddings"]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}: not a complete LlamaForCausalLM config")
    out = {field: hf[key] for key, field in FIELDS.items() if key in hf}
    out["n_kv_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    out["rope_theta"] = float(_rope_theta(hf, path))
    if kind == "mixtral":
        out |= {field: hf[key] for key, field in MOE_FIELDS.items()}
        out |= {"router_score": "softmax", "n_shared_experts": 0, "first_dense_layers": 0, "capacity_factor": 0.0}
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise ConfigError(
            f"{path}: head_dim={head_dim} x num_attention_heads={hf['num_attention_heads']} != hidden_size="
            f"{hf['hidden_size']}; meshtrain's attention needs head_dim = hidden_size / heads"
        )
    return out


def _rope_theta(hf: dict[str, Any], path: Path) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(
            f"{path}: rope scaling rope_type={kind!r} is not supported (meshtrain implements plain RoPE only)"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def write_hf_config(m: ModelConfig, dtype: str, eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json for a LlamaForCausalLM (MixtralForCausalLM) computing what `m` does, in `dtype`."""
    kind = "mixtral" if m.n_experts else "llama"
    if kind == "mixtral":
        check_mixtral(m)
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "dtype": dtype}
    for key, field in FIELDS.items():
        out[key] = getattr(m, field)
    out["intermediate_size"] = m.moe_ffn_dim if m.n_experts else m.hidden_dim  # what a 0 ("derived") means
    if kind == "mixtral":
        out |= {"num_local_experts": m.n_experts, "num_experts_per_tok": m.top_k, "output_router_logits": False}
    out |= {"num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim, **REQUIRED[kind]}
    out["rope_theta"] = m.rope_theta
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": m.rope_theta}
    out["attention_dropout"] = 0.0
    out["initializer_range"] = m.init_std
    if eos_token_id is not None:
        out["eos_token_id"] = eos_token_id
    return out


def check_mixtral(m: ModelConfig) -> None:
    """ConfigError unless this MoE computes exactly what MixtralForCausalLM does (module docstring)."""
    differs = {
        "model.router_score": (m.router_score, "softmax"),
        "model.n_shared_experts": (m.n_shared_experts, 0),
        "model.first_dense_layers": (m.first_dense_layers, 0),
        "model.capacity_factor": (m.capacity_factor, 0.0),
    }
    bad = [f"{k}={v!r}" for k, (v, want) in differs.items() if v != want]
    if m.load_balance == "bias":
        bad.append("model.load_balance='bias'")
    if bad:
        raise ConfigError(
            f"{', '.join(bad)}: only a Mixtral-shaped MoE exports (softmax router, no shared experts, no dense "
            "first blocks, dropless, no balancing bias); Hugging Face has no architecture for the rest"
        )
