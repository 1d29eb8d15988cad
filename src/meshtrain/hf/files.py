"""What a Hugging Face model folder holds, read without torch: tensor names and shapes from the
safetensors headers, our names mapped to the files' (meshtrain.hf.weights explains the mapping).
Validation uses it before any process starts."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from meshtrain.config import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_EXPERT = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_ROUTER = re.compile(r"^(model\.layers\.\d+)\.mlp\.gate\.weight$")
_MIXTRAL = {"gate": "w1", "down": "w2", "up": "w3"}


def to_hf_name(name: str) -> str:
    """Our parameter name -> the name in a Hugging Face file (dense: the same)."""
    if m := _EXPERT.match(name):
        return f"{m[1]}.block_sparse_moe.experts.{m[2]}.{_MIXTRAL[m[3]]}.weight"
    if m := _ROUTER.match(name):
        return f"{m[1]}.block_sparse_moe.gate.weight"
    return name


def expected_params(m: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight of the single-device model `m`, tied weights once."""
    d, hd = m.dim, m.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (m.vocab_size, d))]
    for i in range(m.n_layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (m.n_heads * hd, d)),
            (f"{p}.self_attn.k_proj.weight", (m.n_kv_heads * hd, d)),
            (f"{p}.self_attn.v_proj.weight", (m.n_kv_heads * hd, d)),
            (f"{p}.self_attn.o_proj.weight", (d, m.n_heads * hd)),
            (f"{p}.input_layernorm.weight", (d,)),
            (f"{p}.post_attention_layernorm.weight", (d,)),
        ]
        if m.is_moe_layer(i):
            out.append((f"{p}.mlp.gate.weight", (m.n_experts, d)))
            for j in range(m.n_experts):
                out += _swiglu(f"{p}.mlp.experts.{j}", d, m.moe_ffn_dim)
            if m.n_shared_experts:
                out += _swiglu(f"{p}.mlp.shared_experts", d, m.n_shared_experts * m.moe_ffn_dim)
        else:
            out += _swiglu(f"{p}.mlp", d, m.hidden_dim)
    out.append(("model.norm.weight", (d,)))
    if not m.tie_embeddings:
        out.append(("lm_head.weight", (m.vocab_size, d)))
    return out


def _swiglu(prefix: str, d: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.gate_proj.weight", (width, d)),
        (f"{prefix}.up_proj.weight", (width, d)),
        (f"{prefix}.down_proj.weight", (d, width)),
    ]


def _headers(directory: Path) -> dict[str, tuple[Path, list[int]]]:
    """Tensor name -> (its file, its shape) over DIR's *.safetensors, from their headers alone."""
    out: dict[str, tuple[Path, list[int]]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        out |= {k: (path, v["shape"]) for k, v in header.items() if k != "__metadata__"}
    return out


def header_shapes(directory: Path) -> dict[str, list[int]]:
    """Tensor name -> shape over DIR's *.safetensors (no tensor is read)."""
    return {name: shape for name, (_, shape) in _headers(directory).items()}


def tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the *.safetensors file of DIR that holds it."""
    return {name: path for name, (path, _) in _headers(directory).items()}


def missing_or_misshaped(expected: Iterable[tuple[str, tuple[int, ...]]], found: dict[str, list[int]]) -> list[str]:
    """What DIR lacks or holds in another shape, as readable items."""
    out = []
    for name, shape in expected:
        key = to_hf_name(name)
        if key not in found:
            out.append(f"{key} (missing)")
        elif tuple(found[key]) != shape:
            out.append(f"{key} {found[key]} (expected {list(shape)})")
    return out
