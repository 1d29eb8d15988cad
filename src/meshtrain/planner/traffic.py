"""Every collective one rank issues in an optimizer step: kind, payload, group, count, and the
compute it can hide under. Byte counting (predict_run) and timing both read this one list.

Payload convention: all-reduce counts the tensor reduced; reduce-scatter its full (unsharded)
input; all-gather its full (gathered) output; all-to-all the bytes the rank holds before the
exchange; p2p the bytes sent.

Data-parallel traffic per optimizer step (psi = params on this rank, m = microbatches):
  ZeRO 0: all-reduce grads once (DDP's no_sync during accumulation).
  ZeRO 1: reduce-scatter grads once, all-gather params once after the update.
  ZeRO 2: reduce-scatter grads every microbatch (grads are kept sharded), all-gather params once;
          under a zero-bubble pipeline schedule once per step, like ZeRO 1 (its W step computes
          weight gradients outside autograd, so meshtrain reduces them once, in finish()).
  ZeRO 3: all-gather params in every forward and every backward, reduce-scatter every microbatch;
          under a zero-bubble schedule the same bytes (W reads no weight, so nothing is gathered
          for it; a unit's reduce-scatter waits for its W instead of following its B).
  HSDP (dp_replicate > 1 with ZeRO): the grad shard is all-reduced across replicas once.
With one microbatch these are the 2 psi, 2 psi and 3 psi of Rajbhandari et al. 2020.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshtrain.model.math import ModelShape
from meshtrain.planner.layout import Layout, RankParams, deferred_weight_grads, groups, layers_per_rank
from meshtrain.planner.memory import MIB, StateDtypes

# Phases say what a collective overlaps with (see timing.py):
#   exposed_fwd / exposed_bwd: on the critical path of every microbatch (TP, EP; no async TP)
#   attention_fwd / attention_bwd: ring attention, hidden under the attention kernels
#   bwd_last: hidden under the last microbatch's backward     bwd_each: under every backward
#   fwd_first: under the next step's first forward            fwd_each: under every forward
#   pipeline: stage-to-stage sends


@dataclass(frozen=True)
class Collective:
    name: str
    kind: str
    payload: float
    """Bytes per call, by the convention in the module docstring."""
    group: str
    calls: float
    """Calls per optimizer step."""
    phase: str
    chunk: float = 0.0
    """Bytes per bucket or ZeRO-3 unit; 0 when the call is issued whole."""


@dataclass(frozen=True)
class TrafficInputs:
    seq_len: int
    microbatches: int
    dtypes: StateDtypes
    act_bytes: int
    reduce_bytes: int
    bucket_mb: float
    residual_bytes: int | None = None
    """Bytes per element of the residual stream between regions (the embedding's output and its
    gradient); None: act_bytes, as in Megatron's bf16 models. meshtrain's autocast keeps it fp32."""
    aux_loss: bool = False
    """MoE's sequence-wise auxiliary loss is on: under CP each forward sums its expert counts over cp."""


def _tp_collectives(
    shape: ModelShape,
    lay: Layout,
    ti: TrafficInputs,
    layers: float,
    tokens: float,
    hidden: float,
    redo: int,
    ends: tuple[bool, bool],
) -> list[Collective]:
    """Megatron TP traffic of a rank holding `layers` blocks, plus the embedding / head it holds.

    Per block and microbatch, two regions (attention, MLP), each one collective forward and one
    backward: all-reduces, or under SP an all-gather / reduce-scatter pair each way. The embedding
    adds one forward, the head one backward. Under SP each column-parallel region (and the head)
    keeps only its sequence shard and gathers it again in backward for the weight gradient, and the
    norms' partial weight gradients are all-reduced once per step. The vocab-parallel loss reduces
    three fp32 values per token (max, sum of exponentials, target logit). Full recomputation replays
    each block's forward only as far as backward needs it (torch's checkpoint stops early): through
    the attention exit and the MLP's entry, not the MLP's exit (under async TP the exit too, see
    the replay below). Async TP turns SP's region collectives into rings (`_sp_collective`).
    """
    if lay.tp == 1:
        return []
    first, last = ends
    m = ti.microbatches
    # entries (attention, MLP, head) and row-parallel exits move activations; the embedding's exit
    # and its backward conjugate move the residual stream, which may be wider (fp32 under autocast)
    entries, exits = (2 * layers + last) * m, 2 * layers * m
    resid = hidden / ti.act_bytes * (ti.residual_bytes or ti.act_bytes)
    out: list[Collective] = []
    if lay.sp:
        out += [
            _sp_collective(lay, "tp all_gather", "all_gather", hidden, entries, "exposed_fwd"),
            _sp_collective(lay, "tp reduce_scatter", "reduce_scatter", hidden, exits, "exposed_fwd"),
            _sp_collective(lay, "tp all_gather", "all_gather", hidden, exits, "exposed_bwd"),
            _sp_collective(lay, "tp reduce_scatter", "reduce_scatter", hidden, entries, "exposed_bwd"),
            _sp_collective(lay, "tp sp regather", "all_gather", hidden, entries, "exposed_bwd"),
        ]
        if first:
            out += [
                Collective("tp embedding", "reduce_scatter", resid, "tp", m, "exposed_fwd"),
                Collective("tp embedding", "all_gather", resid, "tp", m, "exposed_bwd"),
            ]
        norms = (2 * layers + last) * shape.hidden * ti.dtypes.grad
        out.append(Collective("tp sp norm grads", "all_reduce", norms, "tp", 1, "bwd_last"))
    else:
        out += [
            Collective("tp all_reduce", "all_reduce", hidden, "tp", exits, "exposed_fwd"),
            Collective("tp all_reduce", "all_reduce", hidden, "tp", entries, "exposed_bwd"),
        ]
        if first:
            out.append(Collective("tp embedding", "all_reduce", resid, "tp", m, "exposed_fwd"))
    if redo > 1:
        replay = [("all_gather", 2), ("reduce_scatter", 1)] if lay.sp else [("all_reduce", 1)]
        if lay.async_tp:  # the MLP's exit ring replays too: it saves its input only once it has run
            replay = [("all_gather", 2), ("reduce_scatter", 2)]
        out += [
            _sp_collective(lay, f"tp recompute {kind}", kind, hidden, per_block * layers * m, "exposed_bwd")
            for kind, per_block in replay
        ]
    if last:
        out.append(Collective("tp vocab loss", "all_reduce", 3 * tokens * 4, "tp", m, "exposed_fwd"))
    return out


def _sp_collective(lay: Layout, name: str, kind: str, hidden: float, calls: float, phase: str) -> Collective:
    """One of SP's region collectives; under async TP its ring instead: t - 1 sends of one sequence
    chunk (p2p payload (t-1)/t of the collective's, the same wire bytes). The rings overlap their
    matmuls, which the time model does not credit: they stay in the exposed phases."""
    if lay.async_tp and kind != "all_reduce":
        return Collective(f"{name} ring", "p2p", hidden * (lay.tp - 1) / lay.tp, "tp", calls, phase)
    return Collective(name, kind, hidden, "tp", calls, phase)


def _cp_collectives(
    shape: ModelShape, lay: Layout, ti: TrafficInputs, blocks: float, tokens: float, redo: int
) -> list[Collective]:
    """Context-parallel traffic of `blocks` block passes (layers x microbatches) on `tokens` tokens.

    Ring (meshtrain.context_parallel.ring): forward, cp - 1 sends of this rank's keys and values
    (one message, the kv heads on this tp rank); backward sends them around again (cp - 1) and the
    travelling gradient of each block cp times (the last hop brings it home), accumulated in fp32.
    Full recomputation replays the forward ring. Ulysses: four all-to-alls each way (q, k, v in,
    the output back), of the tensor this rank holds; recomputation replays the forward four.
    """
    if lay.cp_mode == "ulysses":
        q_or_out, k_or_v = (tokens * width / lay.tp * ti.act_bytes for width in (shape.hidden, shape.kv_dim))
        return [
            Collective(f"cp ulysses {what}", "all_to_all", size, "cp", 2 * blocks * passes, phase)
            for what, size in (("q, out", q_or_out), ("k, v", k_or_v))
            for phase, passes in (("exposed_fwd", 1), ("exposed_bwd", redo))
        ]
    kv = tokens * 2 * shape.kv_dim / lay.tp
    n = (lay.cp - 1) * blocks
    return [
        Collective("cp ring kv", "p2p", kv * ti.act_bytes, "cp", n, "attention_fwd"),
        Collective("cp ring kv", "p2p", kv * ti.act_bytes, "cp", n * redo, "attention_bwd"),
        Collective("cp ring dkv", "p2p", kv * 4, "cp", lay.cp * blocks, "attention_bwd"),
    ]


def _activation_collectives(
    shape: ModelShape, lay: Layout, ti: TrafficInputs, ends: tuple[bool, bool], layers: int
) -> list[Collective]:
    """TP, CP, EP and PP traffic, all proportional to one microbatch's activations."""
    m = ti.microbatches
    tokens = lay.micro_batch * ti.seq_len / lay.cp
    hidden = tokens * shape.hidden * ti.act_bytes
    redo = 2 if lay.recompute == "full" else 1  # full recompute replays the forward's traffic in backward
    out: list[Collective] = []
    out += _tp_collectives(shape, lay, ti, layers, tokens, hidden, redo, ends)
    moe_blocks = layers - (min(shape.first_dense_layers, layers) if ends[0] else 0) if shape.is_moe else 0
    if lay.cp > 1:
        out += _cp_collectives(shape, lay, ti, layers * m, tokens, redo)
        if moe_blocks and ti.aux_loss:  # each sequence's fp32 expert counts, per MoE block and forward
            counts = 4 * lay.micro_batch * shape.n_experts
            out.append(
                Collective("moe sequence counts", "all_reduce", counts, "cp", moe_blocks * m * redo, "exposed_fwd")
            )
    if lay.ep > 1:
        # per MoE block and microbatch: the token rows out and back (this rank's own T*k rows each
        # way, meshtrain.expert_parallel.comm), the same in backward, and the int64 counts forward
        routed = tokens * shape.top_k * shape.hidden * (ti.residual_bytes or ti.act_bytes)
        out.append(Collective("ep all_to_all", "all_to_all", routed, "ep", 2 * moe_blocks * m, "exposed_fwd"))
        out.append(Collective("ep all_to_all", "all_to_all", routed, "ep", 2 * moe_blocks * m * redo, "exposed_bwd"))
        counts = 8 * shape.n_experts
        out.append(Collective("ep counts", "all_to_all", counts, "ep", moe_blocks * m * redo, "exposed_fwd"))
    if lay.pp > 1:
        # Narayanan et al.'s scatter/gather: stages exchange 1/tp of the activation each;
        # a middle rank sends activations forward and gradients back for each of its v chunks.
        out.append(Collective("pp send", "p2p", hidden / lay.tp, "pp", 2 * lay.v * m, "pipeline"))
    return out


def _dp_collectives(psi: float, lay: Layout, ti: TrafficInputs, unit: float, expert: bool) -> list[Collective]:
    """Data-parallel traffic for psi elements; `expert` picks the expert-data-parallel groups."""
    if psi <= 0:
        return []
    grad_group, zero_group = ("expert_grad", "expert_zero") if expert else ("grad", "zero")
    zero_n = max(1, lay.zero_group // lay.ep) if expert else lay.zero_group
    grads, params, m = psi * ti.reduce_bytes, psi * ti.dtypes.param, ti.microbatches
    bucket = ti.bucket_mb * MIB
    tag = "expert " if expert else ""
    if lay.zero == 0:
        return [Collective(f"{tag}dp grads", "all_reduce", grads, grad_group, 1, "bwd_last", bucket)]
    out: list[Collective] = []
    if lay.zero == 3:
        out.append(
            Collective(f"{tag}zero3 params", "all_gather", params, zero_group, m, "fwd_each", unit * ti.dtypes.param)
        )
        out.append(
            Collective(f"{tag}zero3 params", "all_gather", params, zero_group, m, "bwd_each", unit * ti.dtypes.param)
        )
        out.append(
            Collective(f"{tag}zero3 grads", "reduce_scatter", grads, zero_group, m, "bwd_each", unit * ti.reduce_bytes)
        )
    else:
        per_micro = lay.zero == 2 and not deferred_weight_grads(lay)
        out.append(
            Collective(
                f"{tag}zero grads",
                "reduce_scatter",
                grads,
                zero_group,
                m if per_micro else 1,
                "bwd_each" if per_micro else "bwd_last",
                bucket,
            )
        )
        out.append(Collective(f"{tag}zero params", "all_gather", params, zero_group, 1, "fwd_first", bucket))
    if lay.dp_replicate > 1:
        out.append(Collective(f"{tag}hsdp grads", "all_reduce", grads / zero_n, "replicate", 1, "bwd_last", bucket))
    return out


def step_collectives(
    shape: ModelShape,
    lay: Layout,
    ti: TrafficInputs,
    rp: RankParams,
    ends: tuple[bool, bool] = (True, True),
    layers: int | None = None,
) -> list[Collective]:
    """All traffic of one optimizer step on a rank holding `rp` (grad-norm scalars excluded).

    `ends` says whether the rank holds the embedding and the head (first and last pipeline stage),
    `layers` how many blocks (default: the busiest rank's, layers_per_rank).
    """
    out = _activation_collectives(shape, lay, ti, ends, layers_per_rank(shape, lay) if layers is None else layers)
    if lay.grad_group > 1:
        out += _dp_collectives(rp.dense, lay, ti, rp.unit_dense, expert=False)
        if shape.is_moe:
            # the step's expert load, drops and balancing losses, summed once over dp x cp in float64
            # (meshtrain.expert_balance): E + 4 numbers per MoE block this rank holds
            moe_blocks = rp.expert / (rp.unit_expert or 1)
            out.append(
                Collective(
                    "moe expert load", "all_reduce", 8 * (shape.n_experts + 4) * moe_blocks, "grad", 1, "bwd_last"
                )
            )
        if rp.expert and lay.grad_group // lay.ep > 1:
            out += _dp_collectives(rp.expert, lay, ti, rp.unit_expert, expert=True)
    sizes = groups(lay, gpus_per_node=1)  # only the sizes matter here
    return [c for c in out if sizes[c.group].size > 1]
