"""Per-device memory: model states (ZeRO 0-3, CPU offload), activations, temporary buffers.

Model states follow Rajbhandari et al. 2020 with the bytes per element as parameters:
  P = params, G = grads, O = optimizer (master copy + Adam m, v), N = ZeRO group size
  stage 0: P + G + O       stage 1: P + G + O/N       stage 2: P + (G + O)/N       stage 3: (P + G + O)/N
Mixed precision holds 2 + 2 + (4 + 8) bytes = 16 psi (stage 1: 4 psi + 12 psi/N, ...); our fp32 CPU
runs hold 4 + 4 + (0 + 8) = 16 psi too, but split 8 psi + 8 psi/N at stage 1 and 4 psi + 12 psi/N at stage 2.

Activations follow Korthikanti et al. 2022, rebuilt term by term so the same code covers GPT
(which gives their sbh(34 + 5as/h) exactly), Llama's SwiGLU and GQA, and flash attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshtrain.model.math import ModelShape
from meshtrain.planner.layout import Layout, RankParams, deferred_weight_grads, layers_per_rank
from meshtrain.planner.pipeline_sim import simulated_in_flight

MIB = 2**20


@dataclass(frozen=True)
class StateDtypes:
    """Bytes per element of each model state a rank holds."""

    param: int
    grad: int
    master: int
    """fp32 master weights; 0 when the params themselves are fp32."""
    optim: int
    """Adam's first and second moments together."""


MIXED = StateDtypes(param=2, grad=2, master=4, optim=8)
FP32 = StateDtypes(param=4, grad=4, master=0, optim=8)


def model_state_bytes(psi: float, n: int, stage: int, dt: StateDtypes, offload: bool = False) -> dict[str, float]:
    """Device bytes of params, grads and optimizer state for psi elements sharded over n ranks,
    plus `host` bytes when offloaded (ZeRO-Offload: optimizer state, and from stage 2 the grad shard)."""
    params, grads, optim = psi * dt.param, psi * dt.grad, psi * (dt.master + dt.optim)
    if stage >= 1:
        optim /= n
    if stage >= 2:
        grads /= n
    if stage >= 3:
        params /= n
    host = 0.0
    if offload:
        host, optim = optim, 0.0
        if stage >= 2:
            host, grads = host + grads, 0.0
    return {"params": params, "grads": grads, "optimizer": optim, "host": host}


def activation_terms(shape: ModelShape, key_len: int, act: int, attention: str) -> list[tuple[str, float, bool]]:
    """Bytes one block saves for backward, per token: (name, bytes, split by tp without SP).

    `act` is the activation dtype's size; dropout masks are 1 byte. `key_len` is the number of
    keys a query sees at once (s, or s/cp for ring attention, which works block by block).
    With act=2, dropout and naive attention on a GPT block this is Korthikanti's
    10 replicated + 24 split (x h) + 5*a*s per token, i.e. sbh(34 + 5as/h) per layer.
    """
    d, kv, a = shape.hidden, shape.kv_dim, shape.n_heads
    mask = 1 if shape.dropout else 0
    terms: list[tuple[str, float, bool]] = [
        ("norm inputs", 2 * act * d, False),
        ("qkv input", act * d, False),
        ("q, k", act * (d + kv), True),
        ("v", act * kv, True),
    ]
    if attention == "naive":
        # softmax output, and with dropout its mask and the dropped probabilities
        terms.append(("attention scores", a * key_len * (act + mask * (1 + act)), True))
    else:
        terms.append(("softmax stats", a * 4, True))  # flash keeps only the fp32 log-sum-exp
    terms += [
        ("attention output", act * d, True),
        ("attention dropout mask", mask * d, False),
        ("mlp input", act * d, False),
    ]
    if shape.is_moe:
        # each routed copy keeps its input and the four SwiGLU tensors below
        terms.append(("expert activations", shape.top_k * act * (d + 4 * shape.expert_ffn), True))
    elif shape.kind == "llama":
        # gate output, silu(gate), up output, their product (the down projection's input)
        terms.append(("mlp hidden", 4 * act * shape.ffn, True))
    else:
        terms.append(("mlp hidden", 2 * act * shape.ffn, True))  # GeLU input and output
    terms.append(("mlp dropout mask", mask * d, False))
    return terms


def layer_activation_bytes(
    shape: ModelShape, tokens: float, key_len: int, act: int, attention: str, tp: int, sp: bool, recompute: str
) -> float:
    """Bytes one block keeps per microbatch between its forward and backward.

    none: every term; selective: all but the attention scores (34sbh/t with SP);
    full: only the block input, 2sbh (sbh*act), split by tp under SP.
    """
    if recompute == "full":
        return tokens * act * shape.hidden / (tp if sp else 1)
    total = 0.0
    for name, per_token, split in activation_terms(shape, key_len, act, attention):
        if recompute == "selective" and name == "attention scores":
            continue
        total += per_token / (tp if split or sp else 1)
    return tokens * total


def in_flight_microbatches(schedule: str, p: int, v: int, m: int, rank: int) -> float:
    """Microbatches of a rank's layers held at its activation peak, for pipeline rank `rank`.

    GPipe keeps all m. 1F1B and ZB-H1 keep p - rank (Narayanan et al. 2021; Qi et al. 2023).
    ZB-H2 doubles the warm-up: 2(p - rank) - 1. Interleaved 1F1B warms up with
    2(p - rank - 1) + (v - 1)p model chunks (Megatron's schedule), so rank 0 holds
    p(1 + (p - 1)/(p v)) full microbatches, Korthikanti et al.'s factor.
    """
    if p == 1:
        return 1.0
    simulated = simulated_in_flight(schedule, p, v, m, rank)
    if simulated is not None:  # the executor's own action lists, counted by the simulator
        return simulated
    if schedule == "gpipe":
        held = float(m)
    elif schedule == "interleaved-1f1b":
        held = (2 * (p - rank - 1) + (v - 1) * p + 1) / v
    elif schedule == "zb-h2":
        held = 2.0 * (p - rank) - 1
    else:
        held = float(p - rank)
    return min(held, float(m))


@dataclass(frozen=True)
class MemoryInputs:
    """What the memory model needs beyond the shape and layout."""

    seq_len: int
    microbatches: int
    dtypes: StateDtypes
    act_bytes: int
    attention: str
    bucket_mb: float


def rank_memory(shape: ModelShape, lay: Layout, mi: MemoryInputs, rp: RankParams, stage: int) -> dict[str, float]:
    """Named per-device bytes for pipeline rank `stage` (0 = first, pp - 1 = last)."""
    out: dict[str, float] = {}
    dense = model_state_bytes(rp.dense, lay.zero_group, lay.zero, mi.dtypes, lay.offload)
    expert = model_state_bytes(rp.expert, max(1, lay.zero_group // lay.ep), lay.zero, mi.dtypes, lay.offload)
    for key in ("params", "grads", "optimizer"):
        out[key] = dense[key] + expert[key]
    tokens = lay.micro_batch * mi.seq_len / lay.cp
    args = (shape, tokens, mi.seq_len // lay.cp, mi.act_bytes, mi.attention, lay.tp, lay.sp)
    per_layer = layer_activation_bytes(*args, lay.recompute)
    held = in_flight_microbatches(lay.schedule, lay.pp, lay.v, mi.microbatches, stage)
    if lay.cp > 1 and lay.cp_mode == "ulysses" and lay.recompute != "full":
        # SDPA keeps its head-sharded output; the o_proj input is another tensor, after the all-to-all
        per_layer += tokens * mi.act_bytes * shape.hidden / lay.tp
    out["activations"] = held * layers_per_rank(shape, lay) * per_layer
    if lay.recompute == "full":
        out["recompute working set"] = layer_activation_bytes(*args, "none")
    if stage == lay.pp - 1:
        # bf16 logits plus their fp32 upcast for the loss, vocab-parallel over tp
        out["logits"] = tokens * shape.vocab / lay.tp * (mi.act_bytes + 4)
    if lay.zero == 3:
        # the block being computed and the prefetched next one, plus one block's unsharded grads
        out["zero3 gathered params"] = 2 * rp.unit * mi.dtypes.param
        out["zero3 unsharded grads"] = rp.unit * mi.dtypes.grad
    if lay.zero == 3 and deferred_weight_grads(lay):
        # a unit whose W is still to run keeps its norms' unsharded gradients from B (meshtrain.zero.stage3)
        norms = 2 * layers_per_rank(shape, lay) + (1 if stage == lay.pp - 1 else 0)
        out["zero3 norm grads until W (zero-bubble)"] = norms * shape.hidden * mi.dtypes.grad
    if lay.zero == 2 and deferred_weight_grads(lay):
        out["zero2 whole grads (zero-bubble)"] = rp.total * mi.dtypes.grad  # held until the step's one reduction
    if lay.grad_group > 1:
        # one bucket reducing while the next fills, never more than the gradients themselves
        out["comm buckets"] = min(2 * mi.bucket_mb * MIB, rp.total * mi.dtypes.grad)
    out["host (offload)"] = dense["host"] + expert["host"]
    return out


def device_total(breakdown: dict[str, float]) -> float:
    return sum(v for k, v in breakdown.items() if not k.startswith("host"))
