"""Builds this rank's pipeline stages and the executor that runs its part of the schedule.

The stages come out as single-device modules; the trainer then parallelizes them (tensor parallelism swaps their
layers) and then calls `executor.split_weight_grads()`, so the B/W split sees the final layers.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from meshtrain.accounting import CommStats
from meshtrain.config import Config
from meshtrain.loss import cross_entropy_sum
from meshtrain.pipeline.executor import PipelineExecutor
from meshtrain.pipeline.schedules import build_schedule
from meshtrain.pipeline.stage import StageChunks, build_stage, split_blocks, stage_ranges
from meshtrain.topology import Topology


def build_pipeline(cfg: Config, topo: Topology, device: torch.device, stats: CommStats,
                   autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[StageChunks, PipelineExecutor]:
    p, t = cfg.parallel, cfg.training
    n_stages = p.pp * p.pp_chunks
    ranges = stage_ranges(split_blocks(cfg.model, n_stages, p.pp_split))
    schedule, layout = build_schedule(p.pp_schedule, p.pp, t.grad_accum, p.pp_chunks)
    me = topo.local_rank("pp")
    mine = {s: build_stage(cfg.model, s, ranges[s], n_stages, device, t.seed)
            for s in range(n_stages) if layout.rank_of(s) == me}
    # Under sequence parallelism the residual stream between stages is sequence-sharded: each tp rank
    # sends its shard to the same tp rank of the next stage (the pp group pairs them), 1/tp of the bytes.
    seq = t.seq_len // p.tp if p.sequence_parallel else t.seq_len
    executor = PipelineExecutor(stages=mine, actions=schedule[me], layout=layout, group=topo.group("pp"),
                                stats=stats, loss_fn=cross_entropy_sum, act_shape=(t.micro_batch, seq, cfg.model.dim),
                                device=device, autocast=autocast)
    return StageChunks(mine), executor


def describe_split(cfg: Config) -> str:
    p = cfg.parallel
    ranges = stage_ranges(split_blocks(cfg.model, p.pp * p.pp_chunks, p.pp_split))
    return " | ".join(f"stage {s}: blocks {r.start}-{r.stop - 1}" for s, r in enumerate(ranges))
