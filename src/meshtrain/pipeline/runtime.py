"""Builds this rank's pipeline stages and the executor that runs its part of the schedule."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from meshtrain.accounting import CommStats
from meshtrain.config import Config
from meshtrain.loss import cross_entropy_sum
from meshtrain.pipeline.executor import PipelineExecutor
from meshtrain.pipeline.schedules import SCHEDULES, Kind, Layout
from meshtrain.pipeline.split_backward import WeightGradQueue, enable_split_backward
from meshtrain.pipeline.stage import StageChunks, build_stage, split_blocks, stage_ranges
from meshtrain.topology import Topology


def build_pipeline(cfg: Config, topo: Topology, device: torch.device, stats: CommStats,
                   autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[StageChunks, PipelineExecutor]:
    p, t = cfg.parallel, cfg.training
    n_stages = p.pp * p.pp_chunks
    ranges = stage_ranges(split_blocks(cfg.model, n_stages, p.pp_split))
    schedule = SCHEDULES[p.pp_schedule](p.pp, t.grad_accum, p.pp_chunks)
    layout = Layout.looped(p.pp, p.pp_chunks)
    me = topo.local_rank("pp")
    mine = {s: build_stage(cfg.model, s, ranges[s], n_stages, device, t.seed)
            for s in range(n_stages) if layout.rank_of(s) == me}
    queue = WeightGradQueue()
    if any(a.kind == Kind.W for a in schedule[me]):
        for stage in mine.values():
            enable_split_backward(stage, queue)
    executor = PipelineExecutor(stages=mine, actions=schedule[me], layout=layout, group=topo.group("pp"),
                                stats=stats, loss_fn=cross_entropy_sum,
                                act_shape=(t.micro_batch, t.seq_len, cfg.model.dim), device=device,
                                autocast=autocast, queue=queue)
    return StageChunks(mine), executor


def describe_split(cfg: Config) -> str:
    p = cfg.parallel
    ranges = stage_ranges(split_blocks(cfg.model, p.pp * p.pp_chunks, p.pp_split))
    return " | ".join(f"stage {s}: blocks {r.start}-{r.stop - 1}" for s, r in enumerate(ranges))
