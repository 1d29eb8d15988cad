"""Predictions for one concrete run of our own config, in the units its metrics.jsonl logs.

Our runs hold fp32 params, fp32 grads and fp32 Adam moments (bf16 is autocast over fp32
weights; ZeRO-3 gathers bf16 copies but keeps fp32 shards), so model states are 16 bytes per
element before ZeRO. With CPU offload the host also keeps an fp32 master shard, and
mem_model_state_bytes counts host and device together (on a CPU run they are the same memory).
Counts are exact and per rank; for ZeRO the shard is psi/N (the padding that rounds each flat
unit up to a multiple of N is left out), so a sharded figure may be fractional. Each rank's figures
are those of its pipeline stages, with the run's real block split (parallel.pp_split): they are
what that rank writes to metrics.rank{R}.jsonl. A pipeline rank sends each of its chunks'
activations forward (but the last stage's) and each chunk's input gradient back (but the first
stage's), where the neighbour stage is on another rank (ZB-V's V turns on one rank), in the residual stream's dtype (fp32 under autocast, bf16 when ZeRO-3 gathers bf16
weights), 1/tp of them under sequence parallelism, and of this cp rank's tokens only.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

from meshtrain.config import Config, ConfigError
from meshtrain.model.math import from_model_config, param_count, shape_flops_per_token
from meshtrain.pipeline.schedules import SCHEDULES, layout_of
from meshtrain.pipeline.schedules import Layout as Placement
from meshtrain.pipeline.stage import split_blocks
from meshtrain.planner.comm import wire_bytes
from meshtrain.planner.contention import DP_PHASES, on_shared_cores, shared
from meshtrain.planner.evaluate import Plan, Workload, _stage_params, evaluate, traffic_inputs
from meshtrain.planner.layout import Layout, groups, rank_params
from meshtrain.planner.memory import FP32, MemoryInputs, StateDtypes, model_state_bytes, rank_memory
from meshtrain.planner.presets import ClusterSpec
from meshtrain.planner.timing import _phase_costs
from meshtrain.planner.traffic import TrafficInputs, step_collectives
from meshtrain.validate import validate

COMM_KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "p2p")


def config_layout(cfg: Config) -> Layout:
    """The Layout a validated config runs (partial activation checkpointing counts as full)."""
    p, t = cfg.parallel, cfg.training
    return Layout(
        tp=p.tp,
        pp=p.pp,
        v=p.pp_chunks,
        schedule=p.pp_schedule,
        cp=p.cp,
        cp_mode=p.cp_mode,
        dp_replicate=p.dp_replicate,
        dp_shard=p.dp_shard,
        ep=p.ep,
        zero=p.zero_stage,
        micro_batch=t.micro_batch,
        recompute="full" if t.activation_checkpointing == "full" else "none",
        sp=p.sequence_parallel,
        async_tp=p.async_tp,
        offload=p.offload,
    )


def _exact(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _stage_share(cfg: Config, rank: int) -> tuple[int, bool, bool, list[int]]:
    """(blocks, holds the embedding, holds the head, its virtual stages) of `rank`'s pipeline stages."""
    p = cfg.parallel
    n = p.pp * p.pp_chunks
    if p.pp == 1:
        return cfg.model.n_layers, True, True, [0]
    sizes = split_blocks(cfg.model, n, p.pp_split)
    here = _placement(cfg).rank_of
    mine = [s for s in range(n) if here(s) == p.degrees.coords(rank)["pp"]]
    return sum(sizes[s] for s in mine), 0 in mine, n - 1 in mine, mine


def _placement(cfg: Config) -> Placement:
    """The stage placement the run's schedule uses (a custom CSV's is taken to be the looped one)."""
    p = cfg.parallel
    return (
        layout_of(p.pp_schedule, p.pp, p.pp_chunks)
        if p.pp_schedule in SCHEDULES
        else Placement.looped(p.pp, p.pp_chunks)
    )


def _residual_bytes(cfg: Config) -> int:
    """The residual stream (the embedding's output) stays fp32 under autocast, unless ZeRO-3 gathers
    bf16 weights: the embedding then looks up bf16 rows, and the stream is bf16 from there on."""
    return 2 if cfg.parallel.zero_stage == 3 and cfg.training.dtype == "bf16" else 4


def _stage_p2p(cfg: Config, stages: list[int]) -> float:
    """Bytes a pipeline rank sends per step: m activations per chunk but the last stage's, m input
    gradients per chunk but the first stage's."""
    p, t = cfg.parallel, cfg.training
    n = p.pp * p.pp_chunks
    if p.pp == 1:
        return 0.0
    per_message = (
        t.micro_batch * t.seq_len // p.cp * cfg.model.dim * _residual_bytes(cfg) / (p.tp if p.sequence_parallel else 1)
    )
    here = _placement(cfg).rank_of
    # a neighbour stage on the same rank (ZB-V's turn of the V) is handed over without a message
    messages = sum(s < n - 1 and here(s + 1) != here(s) for s in stages) + sum(
        s > 0 and here(s - 1) != here(s) for s in stages
    )
    return messages * t.grad_accum * per_message


def _traffic_inputs(cfg: Config, act: int) -> TrafficInputs:
    t, p, m = cfg.training, cfg.parallel, cfg.model
    # ZeRO-3 gathers parameters in the compute dtype (FSDP's param_dtype); ZeRO-1/2 gather fp32 weights
    gathered = StateDtypes(param=2, grad=4, master=0, optim=8) if p.zero_stage == 3 and t.dtype == "bf16" else FP32
    return TrafficInputs(
        t.seq_len,
        t.grad_accum,
        gathered,
        act,
        4 if p.reduce_dtype == "fp32" else 2,
        p.bucket_mb,
        residual_bytes=_residual_bytes(cfg),
        aux_loss=m.load_balance == "aux_loss" and m.aux_loss_coef > 0,
    )


def predict_run(cfg: Config, world_size: int, rank: int = 0) -> dict[str, Any]:
    """Model-state bytes and per-step communication bytes of rank `rank` when `cfg` runs on
    `world_size` ranks.

    comm_*_bytes follow the payload convention of traffic.py (all-reduce: the tensor reduced;
    reduce-scatter: the full input; all-gather: the full output); comm_wire_bytes is what the
    rank sends under the ring model. Loss and grad-norm scalar reductions are not counted.
    Raises ConfigError for a config that `validate` rejects, and for ZeRO++ and DiLoCo, which are not modelled.
    """
    cfg = validate(cfg, world_size)
    zeropp = [f"parallel.zeropp_{x}=true" for x in ("qwz", "hpz", "qgz") if getattr(cfg.parallel, f"zeropp_{x}")]
    if zeropp:  # its codes, node groups and secondary shards: wrong figures would be worse than none
        raise ConfigError(
            f"the planner does not model ZeRO++ ({', '.join(zeropp)}); plan the plain ZeRO-3 layout, and see "
            f"docs/compression.md for ZeRO++'s bytes"
        )
    if cfg.parallel.diloco > 1:  # islands step on a share of the batch and add an outer step every H steps
        raise ConfigError(
            f"the planner does not model DiLoCo (parallel.diloco={cfg.parallel.diloco}); plan one island's layout "
            "with parallel.diloco=1 and 1/diloco of training.global_batch, and see docs/diloco.md for the outer bytes"
        )
    t, p = cfg.training, cfg.parallel
    shape = from_model_config(cfg.model, t.seq_len)
    lay = config_layout(cfg)
    layers, first, last, stages = _stage_share(cfg, rank)
    rp = rank_params(shape, lay, first=first, last=last, layers=layers)
    act = 2 if t.dtype == "bf16" else 4
    ti = _traffic_inputs(cfg, act)
    sizes = groups(lay, gpus_per_node=1)
    payload: dict[str, float] = defaultdict(float)
    wire = 0.0
    for c in step_collectives(shape, lay, ti, rp, ends=(first, last), layers=layers):
        if c.kind == "p2p" and c.group == "pp":
            continue  # the model's figure is a middle stage's; this rank's is below
        payload[c.kind] += c.calls * c.payload
        wire += c.calls * wire_bytes(c.kind, c.payload, sizes[c.group].size)
    stage_p2p = _stage_p2p(cfg, stages)
    payload["p2p"] += stage_p2p
    wire += stage_p2p
    # offloaded, the host steps its own fp32 master copy: the device's weights cannot be its operands
    held = StateDtypes(param=4, grad=4, master=4 if p.offload else 0, optim=8)
    dense = model_state_bytes(rp.dense, lay.zero_group, lay.zero, held, p.offload)
    expert = model_state_bytes(rp.expert, max(1, lay.zero_group // lay.ep), lay.zero, held, p.offload)
    states = {k: dense[k] + expert[k] for k in ("params", "grads", "optimizer", "host")}
    mi = MemoryInputs(t.seq_len, t.grad_accum, FP32, act, "flash", p.bucket_mb)
    mem = rank_memory(shape, lay, mi, rp, stage=cfg.parallel.degrees.coords(rank)["pp"])
    tokens = t.global_batch * t.seq_len
    out: dict[str, Any] = {
        "world_size": world_size,
        "rank": rank,
        "layout": {k: getattr(lay, k) for k in lay.__dataclass_fields__},
        "n_params": param_count(shape),
        "params_per_rank": _exact(rp.total),
        "mem_params_bytes": _exact(states["params"]),
        "mem_grads_bytes": _exact(states["grads"]),
        "mem_optimizer_bytes": _exact(states["optimizer"]),
        "mem_host_bytes": _exact(states["host"]),
        "mem_model_state_bytes": _exact(sum(states.values())),
        "mem_activation_bytes": _exact(mem["activations"] + mem.get("recompute working set", 0.0)),
        "tokens_per_step": tokens,
        "flops_per_token": shape_flops_per_token(shape, t.seq_len),
        "model_flops_per_step": shape_flops_per_token(shape, t.seq_len) * tokens,
    }
    for kind in COMM_KINDS:
        out[f"comm_{kind}_bytes"] = _exact(payload[kind])
    out["comm_wire_bytes"] = _exact(wire)
    return out


def config_workload(cfg: Config, world_size: int, cluster: ClusterSpec, attention: str = "flash") -> Workload:
    """The planner's Workload for a validated config: its model, batch, bucket size and dtypes.

    Our runs keep fp32 weights, grads and Adam state; only activations follow training.dtype."""
    t = cfg.training
    return Workload(
        from_model_config(cfg.model, t.seq_len),
        cluster,
        world_size,
        t.global_batch,
        t.seq_len,
        attention=attention,
        bucket_mb=cfg.parallel.bucket_mb,
        state_dtypes=FP32,
        activation_bytes=2 if t.dtype == "bf16" else 4,
    )


def _dp_comm(ws: Workload, lay: Layout) -> float:
    """Seconds per step of the DP/ZeRO collectives, none hidden (what evaluate() overlaps)."""
    biggest = max((rp for _, rp in _stage_params(ws, lay)), key=lambda r: r.total)
    colls = step_collectives(ws.shape, lay, traffic_inputs(ws, lay), biggest)
    total, _ = _phase_costs(colls, lay, ws.cluster)
    return sum(total[p] for p in DP_PHASES)


def plan_on(ws: Workload, lay: Layout) -> Plan:
    """evaluate() corrected for ranks that share CPU cores (planner/contention.py; a no-op on a
    cluster without `cores`). `ws.cluster` is already `shared(...)` for `ws.n_gpus` ranks."""
    plan = evaluate(ws, lay)
    times = on_shared_cores(plan.time, lay, ws.cluster, ws.n_gpus, _dp_comm(ws, lay))
    step = sum(times.values())
    k = plan.step_time / step  # utilization is inversely proportional to the step time
    tps = ws.global_batch * ws.seq_len / step
    return dataclasses.replace(plan, time=times, step_time=step, tokens_per_s=tps, mfu=plan.mfu * k, hfu=plan.hfu * k)


def predict_step_time(cfg: Config, world_size: int, cluster: ClusterSpec) -> dict[str, Any]:
    """Seconds of one optimizer step of `cfg` on `world_size` ranks of `cluster`, as the run's
    metrics log `step_time_s`: the planner's breakdown for exactly the run's layout (micro_batch,
    grad_accum, bucket_mb, dtype, schedule, SP, ZeRO stage), with `step_time_s` its sum."""
    cfg = validate(cfg, world_size)
    # ranks beyond the cores share them: measured, not assumed away (planner/contention.py)
    plan = plan_on(config_workload(cfg, world_size, shared(cluster, world_size)), config_layout(cfg))
    return {"step_time_s": plan.step_time, "breakdown": dict(plan.time), "tokens_per_s": plan.tokens_per_s}
