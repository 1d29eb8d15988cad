"""The one build path: this rank's part of the parallel model, built in a fixed, documented order.

The model is written for one device; every parallelism is applied to it from outside, here and
nowhere else, in this order (torchtitan's, with the pipeline first):

  1. pipeline split            which blocks live on this rank: its stages, built on the meta device
                               and initialised with the single-device values (skipped at pp = 1)
  2. tensor parallelism        the plan (data) swaps linears, embedding and head for parallel layers;
     expert parallelism        each rank keeps its experts, MoE layers dispatch by all-to-all
  3. context parallelism       every block's attention spans the cp ranks (ring or Ulysses); the
                               runner cuts each micro-batch to this rank's share of the sequence
  4. activation checkpointing  chosen blocks recompute in backward; they are already parallel
  5. compile                   torch.compile of each block's body (or each whole part): after the
                               steps that swap layers, before the hooks of DP/ZeRO (meshtrain.compile)
  6. B/W split                 zero-bubble schedules: layers defer their weight gradients to W (it
                               swaps bias-free linears, so it comes before ZeRO-3 hooks modules)
  7. data parallelism / ZeRO   owns the parameters and gradients the steps above produced
  8. the step runner           the plain micro-step loop, or the pipeline executor
  9. the optimizer             AdamW, or 1-bit Adam, whose engine decorator wraps the data-parallel
                               engine in step 7 (it turns the gradient all-reduce off after the freeze)
 10. DiLoCo's outer loop       a step hook over what the optimizer updates: every few steps it averages
                               the islands' pseudo-gradients across the outer group (parallel.diloco)

Every strategy gets plain decisions (groups, dtypes, flags) from here, never the Config, and never
another strategy's code: what one step changes comes back as a value (TensorParallel's loss
function, an engine decorator) that a later step is handed. Strategies plug in by adding a step
here; the trainer calls `build_parallel` once and knows none of them (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from meshtrain.accounting import CommStats
from meshtrain.activation_checkpoint import apply_activation_checkpointing
from meshtrain.compile import apply_compile
from meshtrain.compression.onebit_adam import OneBitAdamEngine
from meshtrain.config import Config
from meshtrain.context_parallel import ContextParallel, apply_context_parallel
from meshtrain.core.engine import DisjointParts, GradEngine
from meshtrain.core.runner import (
    Autocast,
    BatchTransform,
    LossFn,
    LossReduction,
    MicroStepRunner,
    StepHook,
    StepRunner,
    keep_batch,
)
from meshtrain.core.weight_grads import WeightGradQueue, split_weight_grads
from meshtrain.data_parallel import DataParallel
from meshtrain.diloco import DiLoCo, ElasticIslands, FixedIslands, OuterGroup, OuterSettings
from meshtrain.expert_balance import ExpertBalance
from meshtrain.expert_parallel import ExpertParallel, ExpertParallelEngine, apply_expert_parallel
from meshtrain.loss import cross_entropy_sum
from meshtrain.model import Llama, build_model
from meshtrain.model.moe import LossScale, moe_layers
from meshtrain.optim import AdamW
from meshtrain.pipeline.executor import PipelineExecutor, TwoBWExecutor
from meshtrain.pipeline.schedules import TWO_BW, Kind, Layout, Schedule, build_schedule, two_bw_window
from meshtrain.pipeline.stage import build_stage, describe_split, split_blocks, stage_ranges
from meshtrain.tensor_parallel import LLAMA_PLAN, TensorParallel, TensorParallelEngine, apply_tensor_parallel_parts
from meshtrain.topology import Topology
from meshtrain.zero import ExpertShards, ShardGroups, ZeroPP, build_zero_engine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ParallelModel:
    """What the build path hands the trainer."""

    parts: list[nn.Module]
    """This rank's model parts in forward order: the whole model, or its pipeline stages."""
    engine: GradEngine
    runner: StepRunner
    reduce_loss: LossReduction
    sampler: Llama | None
    """The whole model, to sample from on this rank; None when it is cut into pipeline stages."""
    optimizer: AdamW
    """Steps `engine.optim_params()` with `engine.optim_grads()`: AdamW, or a subclass (1-bit Adam)."""
    hooks: list[StepHook] = field(default_factory=list)
    """Once-a-step work of model features (MoE's expert balance), run by the trainer before the optimizer."""


@dataclass(frozen=True)
class PipelinePlan:
    schedule: Schedule
    layout: Layout
    ranges: list[range]
    """Blocks of each virtual stage."""
    windows: dict[tuple[bool, bool], Schedule] | None = None
    """PipeDream-2BW's schedule per (first, last) step (schedules.two_bw_window); None for the others."""

    @property
    def splits_backward(self) -> bool:
        return any(a.kind == Kind.W for actions in self.schedule for a in actions)


def autocast_for(dtype: str, device: torch.device) -> Autocast:
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_parallel(cfg: Config, topo: Topology, device: torch.device, stats: CommStats) -> ParallelModel:
    """Build this rank's model parts, gradient engine and step runner, in the order of the module docstring."""
    t, p = cfg.training, cfg.parallel
    # 1. pipeline split
    pipe = _pipeline_plan(cfg) if p.pp > 1 else None
    parts = _model_parts(cfg, device, pipe, topo.local_rank("pp"))
    # 2. tensor and expert parallelism, 3. context parallelism
    tp, cp = _tensor_parallel(parts, topo, cfg, stats, pipe), _context_parallel(parts, topo, cfg, stats)
    ep = apply_expert_parallel(parts, _axis_group(topo, "ep"), stats) if p.ep > 1 else None
    # what one token's loss weighs in the step's objective: each DiLoCo island steps on its own share
    scale = 1.0 / (t.global_batch // p.diloco * t.seq_len)
    hooks: list[StepHook] = _expert_balance(parts, topo, cfg, stats, scale, cp)
    # 4. activation checkpointing
    for part in parts:  # every part is a Llama (the whole model or a stage), with tp's layers swapped in
        apply_activation_checkpointing(cast(Llama, part).model.layers, t.activation_checkpointing, t.ac_every)
    # 5. compile: compiled lazily at the first call, so the B/W split's swaps below are compiled too
    apply_compile(parts, t.compile)
    # 6. B/W split: before the engine, so that ZeRO-3 hooks the modules the stages will run
    queue = WeightGradQueue()
    split = pipe is not None and pipe.splits_backward
    if split:
        for part in parts:
            split_weight_grads(part, queue)
    # 7. data parallelism or ZeRO, then what the earlier steps change about gradients
    engine = _gradient_engine(parts, topo, cfg, stats, deferred_weight_grads=queue if split else None, experts=ep)
    # 1-bit Adam's decorator sits on the data-parallel engine itself: the decorators below extend its norm
    onebit = _onebit_adam(engine, topo, cfg, stats)
    engine = onebit if onebit is not None else engine
    if ep is not None:  # experts differ across the ep group: their part of the norm is summed over it
        engine = ExpertParallelEngine(engine, ep.expert_params, ep.group, stats)
    if tp is not None:
        engine = TensorParallelEngine(engine, parts, tp, stats)
    pp_group = topo.group("pp")
    if pp_group is not None:  # stages own disjoint parameters
        engine = DisjointParts(engine, pp_group, stats)
    # 8. the step runner
    loss_fn: LossFn = tp.loss_fn if tp is not None and tp.loss_fn is not None else cross_entropy_sum
    autocast = autocast_for(t.dtype, device)
    prepare = cp.shard if cp is not None else keep_batch
    if pipe is None:
        runner: StepRunner = MicroStepRunner(parts[0], engine, loss_fn, scale, device, autocast, prepare)
    else:
        runner = _pipeline_executor(cfg, topo, pipe, parts, engine, loss_fn, queue, stats, device, autocast, prepare)
    optimizer = _optimizer(engine, cfg, onebit)
    # 10. DiLoCo's outer loop
    if p.diloco > 1:
        hooks.append(_diloco(engine, topo, cfg, stats))
    # Tensor-parallel peers hold the same (vocab-parallel) loss: count it once, from tp rank 0.
    return ParallelModel(
        parts,
        engine,
        runner,
        LossReduction(topo.local_rank("tp") == 0, stats, topo.group("island"), topo.degrees.island_size),
        # a cut model, or one whose attention spans the cp ranks, samples through `meshtrain generate`
        sampler=cast(Llama, parts[0]) if pipe is None and cp is None else None,
        optimizer=optimizer,
        hooks=hooks,
    )


def _diloco(engine: GradEngine, topo: Topology, cfg: Config, stats: CommStats) -> DiLoCo:
    """The outer step works on the optimizer's tensors; the ranks holding the same ones inside an
    island (DP's dp x cp replicas, ZeRO's dp_replicate) split each fragment between them. The outer
    group is the mesh's diloco axis, or, when each island is its own launch (diloco.join), a quorum
    of the islands present at each sync (meshtrain.diloco.membership)."""
    d, t = cfg.diloco, cfg.training
    outer_stats = CommStats(topo.node_size, topo.rank)
    outer_stats.log.link = stats.log.link
    if not d.overlap:  # the main thread blocks in the outer step: let the watchdog see it there
        outer_stats.log = stats.log
    settings = OuterSettings(
        d.inner_steps,
        d.outer_lr,
        d.outer_momentum,
        d.pseudo_grad_dtype,
        d.int8_block,
        d.fragments,
        d.overlap,
        island=topo.island,
        total_steps=t.steps,
    )
    replicas = topo.group("dp_replicate" if cfg.parallel.zero_stage else "dp_cp")
    position = topo.local_rank("island")
    islands: OuterGroup = (
        ElasticIslands(d.join, d.island, cfg.parallel.diloco, position, d.timeout_s, outer_stats, t.steps)
        if d.join
        else FixedIslands(topo.group("diloco"))
    )
    return DiLoCo(engine.optim_params(), settings, islands, replicas, position, stats, outer_stats, engine.after_step)


def _onebit_adam(engine: GradEngine, topo: Topology, cfg: Config, stats: CommStats) -> OneBitAdamEngine | None:
    """1-bit Adam's momentum is averaged over the ranks the gradients were summed over (dp x cp)."""
    if cfg.optimizer.name != "onebit_adam":
        return None
    return OneBitAdamEngine(engine, _axis_group(topo, "dp_cp"), stats, cfg.optimizer.freeze_step)


def _optimizer(engine: GradEngine, cfg: Config, onebit: OneBitAdamEngine | None) -> AdamW:
    """9. the optimizer, over what the fully decorated engine exposes."""
    if onebit is not None:
        return onebit.optimizer(engine.optim_params(), cfg.optimizer, engine.no_decay())
    return AdamW(engine.optim_params(), cfg.optimizer, no_decay=engine.no_decay())


def _expert_balance(
    parts: list[nn.Module],
    topo: Topology,
    cfg: Config,
    stats: CommStats,
    token_scale: float,
    cp: ContextParallel | None,
) -> list[StepHook]:
    """MoE layers weigh their balancing losses like the cross-entropy (per sequence and per token of
    the global batch), count whole sequences across the cp ranks, and sum their load over the
    ranks that see different tokens (dp x cp)."""
    layers = moe_layers(parts)
    if not layers:
        return []
    t, m = cfg.training, cfg.model
    for layer in layers.values():
        layer.loss_scale = LossScale(per_sequence=1.0 / t.global_batch, per_token=token_scale)
        if cp is not None:
            layer.sequence_sum = cp.sequence_sum
    return [ExpertBalance(layers, topo.group("dp_cp"), stats, m.load_balance, m.bias_update_rate)]


def _tensor_parallel(
    parts: list[nn.Module], topo: Topology, cfg: Config, stats: CommStats, pipe: PipelinePlan | None
) -> TensorParallel | None:
    p = cfg.parallel
    if p.tp == 1:
        return None
    return apply_tensor_parallel_parts(
        parts, _axis_group(topo, "tp"), LLAMA_PLAN, p.sequence_parallel, stats, strict=pipe is None, async_tp=p.async_tp
    )


def _context_parallel(parts: list[nn.Module], topo: Topology, cfg: Config, stats: CommStats) -> ContextParallel | None:
    p = cfg.parallel
    if p.cp == 1:
        return None
    return apply_context_parallel(parts, _axis_group(topo, "cp"), p.cp_mode, p.cp_balance, stats)


def _axis_group(topo: Topology, axis: str) -> dist.ProcessGroup:
    group = topo.group(axis)
    if group is None:
        raise RuntimeError(f"parallel.{axis} = {topo.size(axis)} but the topology has no {axis} group")
    return group


def _pipeline_plan(cfg: Config) -> PipelinePlan:
    p, t = cfg.parallel, cfg.training
    ranges = stage_ranges(split_blocks(cfg.model, p.pp * p.pp_chunks, p.pp_split))
    if p.pp_schedule == TWO_BW:  # one window per kind of step; the steady one stands for the schedule
        windows = {(a, b): two_bw_window(p.pp, t.grad_accum, a, b) for a in (False, True) for b in (False, True)}
        return PipelinePlan(windows[(False, False)], Layout.looped(p.pp), ranges, windows)
    schedule, layout = build_schedule(p.pp_schedule, p.pp, t.grad_accum, p.pp_chunks, p.pp_slices)
    return PipelinePlan(schedule, layout, ranges)


def _model_parts(cfg: Config, device: torch.device, pipe: PipelinePlan | None, pp_rank: int) -> list[nn.Module]:
    if pipe is None:
        return [build_model(cfg.model, device, seed=cfg.training.seed)]
    n = pipe.layout.num_stages
    return [
        build_stage(cfg.model, s, pipe.ranges[s], n, device, cfg.training.seed)
        for s in range(n)
        if pipe.layout.rank_of(s) == pp_rank
    ]


def _gradient_engine(
    parts: list[nn.Module],
    topo: Topology,
    cfg: Config,
    stats: CommStats,
    deferred_weight_grads: WeightGradQueue | None,
    experts: ExpertParallel | None = None,
) -> GradEngine:
    t, p = cfg.training, cfg.parallel
    bucket_bytes = int(p.bucket_mb * 2**20)
    if p.zero_stage:
        groups = ShardGroups(topo.group("dp_shard_cp"), topo.group("dp_replicate"))
        # an expert's state is sharded over the ranks holding the same expert, replicated like the rest
        shards = (
            ExpertShards(experts.expert_params, ShardGroups(topo.group("edp_shard"), groups.replicate))
            if experts is not None
            else None
        )
        return build_zero_engine(
            parts,
            p.zero_stage,
            groups,
            stats,
            param_dtype=DTYPES[t.dtype],
            reduce_dtype=DTYPES[p.reduce_dtype],
            bucket_bytes=bucket_bytes,
            offload=p.offload,
            prefetch=p.prefetch,
            deferred_weight_grads=deferred_weight_grads,
            experts=shards,
            zeropp=_zeropp(cfg, topo),
        )
    # cp ranks hold the same weights and see different tokens: their gradients are summed like dp's;
    # under expert parallelism an expert's gradient is summed over the ranks that hold it
    return DataParallel(
        parts,
        topo.group("dp_cp"),
        stats,
        bucket_bytes=bucket_bytes,
        reduce_dtype=DTYPES[p.reduce_dtype],
        expert_params=experts.expert_params if experts is not None else set(),
        expert_group=topo.group("edp"),
    )


def _zeropp(cfg: Config, topo: Topology) -> ZeroPP | None:
    """ZeRO++'s parts; the shard group's node groups are made only when hpZ or qgZ needs them."""
    p = cfg.parallel
    if not (p.zeropp_qwz or p.zeropp_hpz or p.zeropp_qgz):
        return None
    hierarchy = p.zeropp_hpz or p.zeropp_qgz
    return ZeroPP(
        p.zeropp_qwz,
        p.zeropp_hpz,
        p.zeropp_qgz,
        p.zeropp_block,
        intra=topo.group("shard_intra") if hierarchy else None,
        inter=topo.group("shard_inter") if hierarchy else None,
    )


def _pipeline_executor(
    cfg: Config,
    topo: Topology,
    pipe: PipelinePlan,
    parts: list[nn.Module],
    engine: GradEngine,
    loss_fn: LossFn,
    queue: WeightGradQueue,
    stats: CommStats,
    device: torch.device,
    autocast: Autocast,
    prepare: BatchTransform,
) -> PipelineExecutor:
    t, p = cfg.training, cfg.parallel
    me = topo.local_rank("pp")
    stages = dict(zip([s for s in range(pipe.layout.num_stages) if pipe.layout.rank_of(s) == me], parts))
    # Stages exchange each cp rank's shard of the sequence (the pp group pairs equal cp and tp ranks);
    # under sequence parallelism the residual stream is sharded again by tp, 1/tp of the bytes.
    seq = t.seq_len // p.cp // (p.tp if p.sequence_parallel else 1)
    # One trace per stage: from the first data-parallel replica's first tp and cp rank.
    traced = topo.local_rank("dp") == 0 and topo.local_rank("tp") == 0 and topo.local_rank("cp") == 0
    trace_path = Path(cfg.logging.run_dir) / "pp_trace" / f"rank{me}.json" if traced else None
    meta = {
        "schedule": p.pp_schedule,
        "pp": p.pp,
        "chunks": p.pp_chunks,
        "microbatches": t.grad_accum,
        "slices": p.pp_slices,
        "steps": t.steps,
    }
    pp_group = topo.group("pp")
    if pp_group is None:
        raise ValueError("a pipeline executor needs a pipeline group (parallel.pp > 1)")
    kwargs: dict[str, Any] = {}
    if pipe.windows is not None:
        windows = {key: schedule[me] for key, schedule in pipe.windows.items()}
        kwargs = {"windows": windows, "microbatches": t.grad_accum, "total_steps": t.steps}
    return (TwoBWExecutor if pipe.windows is not None else PipelineExecutor)(
        stages=stages,
        actions=pipe.schedule[me],
        layout=pipe.layout,
        group=pp_group,
        stats=stats,
        loss_fn=loss_fn,
        act_shape=(t.micro_batch, seq, cfg.model.dim),
        device=device,
        # ZeRO-3 computes with weights gathered in the compute dtype, the embedding's output included
        act_dtype=DTYPES[t.dtype] if p.zero_stage == 3 else torch.float32,
        autocast=autocast,
        scale=1.0 / (t.global_batch // p.diloco * t.seq_len),
        engine=engine,
        queue=queue,
        trace_path=trace_path,
        trace_meta=meta,
        summary=f"{p.pp_schedule}{f' ({p.pp_slices} token slices)' if p.pp_slices > 1 else ''} over {describe_split(pipe.ranges)}",
        prepare=prepare,
        **kwargs,
    )
