"""What a tensor-parallel block costs, in theory and measured: bytes sent and activation bytes saved.

Theory, per block per microbatch, for b sequences of s tokens, hidden size h, activation bytes a:
- communication (Narayanan et al. 2021): without SP, forward 2 all-reduces of b*s*h*a (after
  attention, after the MLP) and backward 2 more (the regions' entries). With SP each all-reduce
  becomes an all-gather + reduce-scatter pair of the same wire volume, plus (Korthikanti et al. 2022,
  sec. 4.2.2) one more all-gather per region in backward, re-gathering the input that was stored
  sharded. Once per step (not per block), SP also all-reduces the norm weights' partial gradients.
- activations (Korthikanti et al. 2022, Table 2, adjusted for this model): see `activation_terms`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import nn

from meshtrain.config import ModelConfig

NORMS_PER_BLOCK = 2
REGIONS_PER_BLOCK = 2  # attention and MLP: one entry, one exit each


def block_comm_theory(b: int, s: int, h: int, act_bytes: int, sequence_parallel: bool) -> dict[str, int]:
    """Payload bytes one block hands to tensor-parallel collectives per microbatch (forward + backward)."""
    x = b * s * h * act_bytes
    if not sequence_parallel:
        return {"all_reduce": 2 * REGIONS_PER_BLOCK * x}
    # forward: gather in, reduce-scatter out; backward: their conjugates plus the re-gather
    return {"all_gather": 3 * REGIONS_PER_BLOCK * x, "reduce_scatter": 2 * REGIONS_PER_BLOCK * x}


def activation_terms(cfg: ModelConfig, tp: int, sequence_parallel: bool, act: int = 4) -> dict[str, float]:
    """Bytes per token one block saves for backward, term by term.

    Korthikanti's per-layer sbh(34 + 5as/h) (2-byte activations, GPT: LayerNorm, GeLU MLP, dropout,
    attention scores stored) becomes, for this Llama block at `act` bytes per element:
      - no dropout: its three masks go (attention's as^2 b, and sbh after attention and after the MLP);
      - SDPA stores no s x s scores: the 5as/h term becomes a fp32 log-sum-exp per head and token;
      - grouped-query attention: k and v are kv_dim wide, not h;
      - SwiGLU: the MLP keeps gate, silu(gate), up and their product (4 ffn) instead of GeLU's 2x4h;
      - RMSNorm, written unfused, keeps its input and the normalised x*rsqrt, plus a fp32 rsqrt per
        token; LayerNorm counted its input only.
    Terms marked replicated are split by tp only under SP; the others always are.
    """
    d, kv, f, heads = cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim, cfg.n_heads
    rep = tp if sequence_parallel else 1
    return {
        "norm inputs and normalised x (2 norms, replicated)": NORMS_PER_BLOCK * 2 * d * act / rep,
        "norm rsqrt, fp32 (2 norms, replicated)": NORMS_PER_BLOCK * 4 / rep,
        "qkv input (replicated)": d * act / rep,
        "q and k after RoPE": (d + kv) * act / tp,
        "v": kv * act / tp,
        "attention output (SDPA's output, the o_proj input)": d * act / tp,
        "attention log-sum-exp, fp32": heads * 4 / tp,
        "mlp input (replicated)": d * act / rep,
        "mlp hidden: gate, silu(gate), up, product": 4 * f * act / tp,
    }


def saved_bytes_per_block(model: nn.Module, blocks: nn.ModuleDict, run: Callable[[], object]) -> dict[str, int]:
    """Bytes of distinct storages autograd saves inside each block while `run()` does a forward.

    Parameters and buffers are not activations and are left out; a storage saved by several blocks
    counts for the first (under SP, the RoPE tables indexed by position are shared by all blocks).
    """
    static = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    per_block: dict[str, int] = {name: 0 for name in blocks}
    current: list[str | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if current[0] is not None and key not in static and key not in seen:
            seen.add(key)
            per_block[current[0]] += t.untyped_storage().nbytes()
        return t

    with ExitStack() as stack:
        for name, block in blocks.items():
            stack.enter_context(block.register_forward_pre_hook(lambda m, a, n=name: current.__setitem__(0, n)))
            stack.enter_context(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        run()
    return per_block
