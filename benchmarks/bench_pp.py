"""Our 1F1B executor against torch.distributed.pipelining's Schedule1F1B on the same stage split.

Both run the default model cut into 2 stages over 2 gloo ranks, the same microbatches and the same
optimizer. Prints tokens/s and their ratio, and the bubble measured from our executor's trace next
to the simulator fed the measured per-action costs and the closed form (p-1)/(m+p-1).
The 2bw row: PipeDream-2BW's executor against our 1F1B on the same stages (a barrier ends each step,
as the trainer's collectives do): tokens/s, a steady step's bubble measured and simulated from the
measured costs, the microbatches in flight per rank and the weight copies 2BW adds.
    python benchmarks/bench_pp.py [--microbatches 4] [--micro-batch 4] [--seq 128] [--rows torch,2bw]
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from common import Timing, bench_model_config, bench_parser, ratio, record, spawn, timed_rounds
from meshtrain.accounting import CommStats
from meshtrain.config import ModelConfig, OptimizerConfig
from meshtrain.core.runner import Batch
from meshtrain.loss import cross_entropy_sum
from meshtrain.optim import AdamW
from meshtrain.pipeline.executor import PipelineExecutor, TwoBWExecutor
from meshtrain.pipeline.schedules import SCHEDULES, Layout, Schedule, two_bw_window
from meshtrain.pipeline.stage import build_stage, split_blocks, stage_ranges
from meshtrain.tools.simulator import from_trace, simulate, simulate_steps
from meshtrain.tools.trace import measured_costs


def _optimizer_step(stage: torch.nn.Module) -> callable:
    params = [(n, p) for n, p in stage.named_parameters()]
    opt = AdamW(params, OptimizerConfig())

    def step() -> None:
        opt.step([p.grad for _, p in params], 1e-4)
        for _, p in params:
            p.grad = None

    return step


def _setup(rank: int, world: int, args: argparse.Namespace) -> tuple[ModelConfig, list[Batch], list[torch.nn.Module]]:
    """The default model, m random microbatches, and two identical copies of this rank's stage."""
    cfg = bench_model_config()
    m, mb, seq = args.microbatches, args.micro_batch, args.seq
    torch.manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (m, mb, seq + 1))
    ranges = stage_ranges(split_blocks(cfg, world, "params"))
    stages = [build_stage(cfg, rank, ranges[rank], world, torch.device("cpu"), seed=0) for _ in range(2)]
    return cfg, [Batch(x, y) for x, y in zip(data[..., :-1], data[..., 1:])], stages


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    m, mb, seq = args.microbatches, args.micro_batch, args.seq
    cfg, batches, (ours_stage, torch_stage) = _setup(rank, world, args)
    tokens, targets = [b.tokens for b in batches], [b.targets for b in batches]
    scale = 1.0 / (m * mb * seq)
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


TRACED = 7  # steady steps traced per executor for the bubble figures


def _stepped(stage: torch.nn.Module, runner: PipelineExecutor) -> Callable[[list[Batch]], None]:
    """One trainer-like step: the runner's passes, the step-end barrier (the trainer's loss and norm
    collectives), then AdamW when the runner has a gradient; gradients live in fixed buffers."""
    params = list(stage.named_parameters())
    for _, p in params:
        p.grad = torch.zeros_like(p)
    opt = AdamW(params, OptimizerConfig())

    def step(batches: list[Batch]) -> None:
        runner.run(batches)
        dist.barrier()
        if runner.gradient_ready():
            opt.step([p.grad for _, p in params], 1e-4)
        for _, p in params:
            p.grad.zero_()

    return step


def two_bw_worker(rank: int, world: int, args: argparse.Namespace) -> None:
    """2BW's row: its executor against our 1F1B on the same stages, data and optimizer."""
    m, mb, seq = args.microbatches, args.micro_batch, args.seq
    cfg, batches, stages = _setup(rank, world, args)
    common = dict(
        layout=Layout.looped(world),
        group=dist.group.WORLD,
        stats=CommStats(),
        loss_fn=cross_entropy_sum,
        act_shape=(mb, seq, cfg.dim),
        device=torch.device("cpu"),
        scale=1.0 / (m * mb * seq),
    )
    windows = {(a, b): two_bw_window(world, m, a, b)[rank] for a in (False, True) for b in (False, True)}
    flush = PipelineExecutor({rank: stages[0]}, SCHEDULES["1f1b"](world, m)[rank], **common)
    # a run that never reaches its last step: the bench keeps stepping, the drain is not timed
    two = TwoBWExecutor(
        {rank: stages[1]}, windows[(False, False)], **common, windows=windows, microbatches=m, total_steps=10**9
    )
    runners = {"meshtrain 2BW": _stepped(stages[1], two), "meshtrain 1F1B": _stepped(stages[0], flush)}
    timings = timed_rounds({k: functools.partial(f, batches) for k, f in runners.items()}, args.rounds, args.steps)
    traces: dict[str, list] = {"2bw": [], "1f1b": []}
    for _ in range(TRACED):  # steady steps, traced; one alone is a noisy sample on a shared machine
        for name, runner in (("2bw", two), ("1f1b", flush)):
            runners[f"meshtrain {name.upper()}"](batches)
            gathered: list = [None] * world
            dist.all_gather_object(gathered, (runner.trace, runner.peak_inflight))
            traces[name].append(gathered)
    held = sum(p.numel() * 4 for p in stages[1].parameters())
    if rank == 0:
        _two_bw_report(args, timings, m * mb * seq, traces, world, m, held)


def _two_bw_report(
    args: argparse.Namespace, timings: dict[str, Timing], tokens: int, traces: dict, pp: int, m: int, held: int
) -> None:
    notes = []
    for name, schedule in (("2bw", [two_bw_window(pp, m, False, False)]), ("1f1b", [SCHEDULES["1f1b"](pp, m)])):
        measured, predicted = [], []
        for sample in traces[name]:
            records = [t for t, _ in sample]
            measured.append(from_trace(records, chunks=1).bubble_rate)
            # each rank's own costs: the stages are not equally fast (the last one computes the loss)
            costs = [measured_costs([rows], 1) for rows in records]
            predicted.append(simulate_steps(schedule, m, costs, carried=1 if name == "2bw" else 0).bubble_rate)
        peaks = ", ".join(f"{peak:g}" for _, peak in traces[name][-1])
        per_rank = ", ".join(f"{1e3 * c.f:.0f}/{1e3 * c.b:.0f}" for c in costs)
        notes.append(
            f"{name}: bubble measured {statistics.median(measured):.1%}, simulated from each rank's costs "
            f"{statistics.median(predicted):.1%} (medians of {len(measured)} steps); "
            f"F/BW ms per rank {per_rank}; in flight per rank {peaks} microbatches"
        )
    notes.append(f"2bw holds two weight copies beside the master: +{2 * held / 2**20:.1f} MiB on rank 0")
    print(f"model: default config, {pp} stages x {m} microbatches, {tokens} tokens per step")
    record(args, [ratio("PP (2BW vs 1F1B)", timings, "meshtrain 2BW", "meshtrain 1F1B", tokens, note="; ".join(notes))])


def main() -> None:
    p = bench_parser(__doc__, steps=4, micro_batch=4)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--rows", default="torch,2bw", help="comma-separated: torch (1F1B vs torch), 2bw (2BW vs 1F1B)")
    args = p.parse_args()
    rows = args.rows.split(",")
    if "torch" in rows:
        spawn(worker, 2, args)
    if "2bw" in rows:
        spawn(two_bw_worker, 2, args)


if __name__ == "__main__":
    main()
