"""Our 1F1B executor against torch.distributed.pipelining's Schedule1F1B on the same stage split.

Both run the default model cut into 2 stages over 2 gloo ranks, the same microbatches and the same
optimizer. Prints tokens/s and their ratio, and the bubble measured from our executor's trace next
to the simulator fed the measured per-action costs and the closed form (p-1)/(m+p-1).
    python benchmarks/bench_pp.py [--microbatches 4] [--micro-batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from common import Timing, bench_model_config, bench_parser, ratio, record, spawn, timed_rounds
from meshtrain.accounting import CommStats
from meshtrain.config import OptimizerConfig
from meshtrain.core.runner import Batch
from meshtrain.loss import cross_entropy_sum
from meshtrain.optim import AdamW
from meshtrain.pipeline.executor import PipelineExecutor
from meshtrain.pipeline.schedules import SCHEDULES, Layout, Schedule
from meshtrain.pipeline.stage import build_stage, split_blocks, stage_ranges
from meshtrain.tools.simulator import from_trace, simulate
from meshtrain.tools.trace import measured_costs


def _optimizer_step(stage: torch.nn.Module) -> callable:
    params = [(n, p) for n, p in stage.named_parameters()]
    opt = AdamW(params, OptimizerConfig())

    def step() -> None:
        opt.step([p.grad for _, p in params], 1e-4)
        for _, p in params:
            p.grad = None

    return step


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    cfg = bench_model_config()
    m, mb, seq = args.microbatches, args.micro_batch, args.seq
    torch.manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (m, mb, seq + 1))
    tokens, targets = list(data[..., :-1]), list(data[..., 1:])
    scale = 1.0 / (m * mb * seq)
    ranges = stage_ranges(split_blocks(cfg, world, "params"))
    ours_stage = build_stage(cfg, rank, ranges[rank], world, torch.device("cpu"), seed=0)
    torch_stage = build_stage(cfg, rank, ranges[rank], world, torch.device("cpu"), seed=0)
    schedule = SCHEDULES["1f1b"](world, m)
    ex = PipelineExecutor(
        {rank: ours_stage},
        schedule[rank],
        Layout.looped(world),
        dist.group.WORLD,
        CommStats(),
        cross_entropy_sum,
        (mb, seq, cfg.dim),
        torch.device("cpu"),
        scale=scale,
    )
    batches = [Batch(x, y) for x, y in zip(tokens, targets)]
    ours_opt, torch_opt = _optimizer_step(ours_stage), _optimizer_step(torch_stage)
    pipe = Schedule1F1B(
        PipelineStage(torch_stage, rank, world, torch.device("cpu")),
        n_microbatches=m,
        loss_fn=lambda out, y: cross_entropy_sum(out, y) * scale,
        scale_grads=False,
    )
    full_x, full_y = torch.cat(tokens), torch.cat(targets)

    def ours() -> None:
        ex.run(batches)
        ours_opt()

    def theirs() -> None:
        if rank == 0:
            pipe.step(full_x)
        else:
            pipe.step(target=full_y)
        torch_opt()

    timings = timed_rounds({"meshtrain 1F1B": ours, "torch Schedule1F1B": theirs}, args.rounds, args.steps)
    ours()
    traces = [None] * world
    dist.all_gather_object(traces, ex.trace)
    if rank == 0:
        _report(args, timings, m * mb * seq, traces, schedule, world, m)


def _report(
    args: argparse.Namespace, timings: dict[str, Timing], tokens: int, traces: list, schedule: Schedule, pp: int, m: int
) -> None:
    measured = from_trace(traces, chunks=1)
    predicted = simulate(schedule, measured_costs(traces, 1))
    print(f"model: default config, {pp} stages x {m} microbatches, {tokens} tokens per step")
    bubble = (
        f"bubble measured {measured.bubble_rate:.1%}, simulated with measured costs {predicted.bubble_rate:.1%}, "
        f"closed form {(pp - 1) / (m + pp - 1):.1%}"
    )
    print(bubble)
    record(args, [ratio("PP (1F1B)", timings, "meshtrain 1F1B", "torch Schedule1F1B", tokens, note=bubble)])


def main() -> None:
    p = bench_parser(__doc__, steps=4, micro_batch=4)
    p.add_argument("--microbatches", type=int, default=4)
    spawn(worker, 2, p.parse_args())


if __name__ == "__main__":
    main()
