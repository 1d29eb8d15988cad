"""Our 1F1B executor against torch.distributed.pipelining's Schedule1F1B on the same stage split.

Both run the default model cut into 2 stages over 2 gloo ranks, the same microbatches and the same
optimizer. Prints tokens/s and their ratio, and the bubble measured from our executor's trace next
to the simulator fed the measured per-action costs and the closed form (p-1)/(m+p-1).

Two more rows race our ZB-V (4 stages of one block, two per rank on the V) against our 1F1B and
our ZB-H1 (2 stages of two blocks; ZB-H1 splits B and W as ZB-V does) on the same model and data: tokens/s, each one's bubble measured from its
trace against the simulator fed its measured costs, and the peak in-flight activations the executor
counted (in full-stage microbatches) against the simulated peak, and each rank's busy time: on the
V, rank 0 holds the embedding and the head as well as its two blocks, which the simulator fed one
median cost per kind does not see.

A last row is TeraPipe against our 1F1B at a small batch of long sequences (one sequence per
microbatch, --tera-sequences of them, --tera-seq tokens each, cut into --tera-slices slices): tokens/s,
each one's bubble measured against simulated, and the peak bytes autograd held on each rank.

The 2bw row: PipeDream-2BW's executor against our 1F1B on the same stages (a barrier ends each step,
as the trainer's collectives do): tokens/s, a steady step's bubble measured and simulated from the
measured costs, the microbatches in flight per rank and the weight copies 2BW adds.
    python benchmarks/bench_pp.py [--microbatches 4] [--micro-batch 4] [--seq 128] [--tera-slices 8]
                                  [--rows torch,terapipe,2bw]   (torch: 1F1B vs torch, then ZB-V)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from common import (
    Timing,
    add_compile_option,
    bench_model_config,
    bench_parser,
    compile_peer_blocks,
    ratio,
    record,
    spawn,
    timed_rounds,
)
from meshtrain.accounting import CommStats
from meshtrain.compile import apply_compile
from meshtrain.config import ModelConfig, OptimizerConfig
from meshtrain.core.runner import Batch
from meshtrain.core.weight_grads import split_weight_grads
from meshtrain.loss import cross_entropy_sum
from meshtrain.optim import AdamW
from meshtrain.pipeline.executor import PipelineExecutor, TwoBWExecutor
from meshtrain.pipeline.schedules import (
    SCHEDULES,
    Layout,
    Schedule,
    build_schedule,
    native_chunks,
    two_bw_window,
)
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


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    rows = args.rows.split(",")
    if "torch" in rows:
        torch_row(rank, world, args)
    if "terapipe" in rows:
        terapipe_row(rank, world, args)


def torch_row(rank: int, world: int, args: argparse.Namespace) -> None:
    """Our 1F1B against torch's Schedule1F1B, then ZB-V against our 1F1B and ZB-H1."""
    cfg = bench_model_config()
    m, mb, seq = args.microbatches, args.micro_batch, args.seq
    torch.manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (m, mb, seq + 1))
    tokens, targets = list(data[..., :-1]), list(data[..., 1:])
    scale = 1.0 / (m * mb * seq)
    ranges = stage_ranges(split_blocks(cfg, world, "params"))
    torch_stage = build_stage(cfg, rank, ranges[rank], world, torch.device("cpu"), seed=0)
    compile_peer_blocks(torch_stage.model.layers, args.compile)
    ex, ours_opt, schedule = _our_pipeline(
        "1f1b", rank, world, m, (mb, seq), scale, split="params", compile_mode=args.compile
    )
    batches = [Batch(x, y) for x, y in zip(tokens, targets)]
    torch_opt = _optimizer_step(torch_stage)
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
    zb_v_row(rank, world, args, batches, scale)


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


def _our_pipeline(
    name: str,
    rank: int,
    world: int,
    microbatches: int,
    act_shape: tuple[int, int],
    scale: float,
    split: str = "uniform",
    slices: int = 1,
    compile_mode: str = "none",
) -> tuple[PipelineExecutor, callable, Schedule]:
    """Our executor running `name` on the default model cut by `split`, its optimizer step, and the
    schedule of every rank; `act_shape` is one microbatch's (batch, sequence)."""
    cfg = bench_model_config()
    chunks = native_chunks(name)
    schedule, layout = build_schedule(name, world, microbatches, chunks, slices)
    ranges = stage_ranges(split_blocks(cfg, world * chunks, split))
    stages = {
        s: build_stage(cfg, s, ranges[s], world * chunks, torch.device("cpu"), seed=0)
        for s in range(layout.num_stages)
        if layout.rank_of(s) == rank
    }
    apply_compile(list(stages.values()), compile_mode)  # build step 5: before the B/W split below
    ex = PipelineExecutor(
        stages,
        schedule[rank],
        layout,
        dist.group.WORLD,
        CommStats(),
        cross_entropy_sum,
        (*act_shape, cfg.dim),
        torch.device("cpu"),
        scale=scale,
    )
    if any(a.kind.value == "W" for a in schedule[rank]):  # W actions need the deferred weight gradients
        for stage in stages.values():
            split_weight_grads(stage, ex.queue)
    steps = [_optimizer_step(stage) for stage in stages.values()]
    return ex, lambda: [step() for step in steps], schedule


def zb_v_row(rank: int, world: int, args: argparse.Namespace, batches: list[Batch], scale: float) -> None:
    """ZB-V against 1F1B, both ours: tokens/s, measured vs simulated bubble, peak in-flight activations."""
    # zb-h1 splits B and W as zb-v does, on the looped placement: it tells the schedule's gain from the split's cost
    shape = (args.micro_batch, args.seq)
    runs = {
        name: _our_pipeline(name, rank, world, args.microbatches, shape, scale, compile_mode=args.compile)
        for name in ("zb-v", "1f1b", "zb-h1")
    }

    def step(name: str) -> callable:
        ex, opt, _ = runs[name]
        return lambda: (ex.run(batches), opt())

    timings = timed_rounds({f"meshtrain {n}": step(n) for n in runs}, args.rounds, args.steps)
    figures = []
    for name, (ex, _, schedule) in runs.items():
        step(name)()  # one more step, whose trace and in-flight peak are read
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (ex.trace, ex.peak_inflight))
        traces, peaks = [g[0] for g in gathered], [g[1] for g in gathered]
        chunks = ex.layout.chunks
        measured = from_trace(traces, chunks=chunks)
        predicted = simulate(schedule, measured_costs(traces, chunks))
        figures.append(
            f"{name}: bubble measured {measured.bubble_rate:.1%} vs simulated {predicted.bubble_rate:.1%}, "
            f"peak in flight {max(peaks):g} vs simulated {simulate(schedule).peak:g}, "
            f"busy per rank {'/'.join(f'{1e3 * b:.0f}' for b in measured.busy)} ms"
        )
    if rank == 0:
        note = "; ".join(figures)
        print(note)
        tokens = args.microbatches * args.micro_batch * args.seq
        rows = [
            ratio(f"PP ZB-V vs {peer}", timings, "meshtrain zb-v", f"meshtrain {peer}", tokens, note if n == 0 else "")
            for n, peer in enumerate(("1f1b", "zb-h1"))
        ]
        record(args, rows)


class _Held:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedBytes:
    """Peak bytes of the distinct storages autograd saves for backward (parameters left out)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.static = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, int] = {}
        self.live = self.peak = 0

    def _pack(self, t: torch.Tensor) -> object:
        key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        holder = _Held(t)
        if key not in self.static:
            if not self.refs.get(key):
                self.live += size
                self.peak = max(self.peak, self.live)
            self.refs[key] = self.refs.get(key, 0) + 1
            weakref.finalize(holder, self._release, key, size)
        return holder

    def _release(self, key: int, size: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= size

    @contextmanager
    def watch(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda holder: holder.tensor):
            yield


def _executor(
    rank: int, world: int, name: str, m: int, slices: int, seq: int
) -> tuple[Callable[[list[Batch]], None], PipelineExecutor, Schedule, Layout, SavedBytes]:
    """`name` over m sequences of `seq` tokens, one per microbatch, watched for the bytes autograd saves."""
    ex, opt, schedule = _our_pipeline(name, rank, world, m, (1, seq), 1.0 / (m * seq), split="params", slices=slices)
    saved = SavedBytes([p for stage in ex.stages.values() for p in stage.parameters()])

    def step(batches: list[Batch]) -> None:
        with saved.watch():
            ex.run(batches)
        opt()

    return step, ex, schedule, ex.layout, saved


def terapipe_row(rank: int, world: int, args: argparse.Namespace) -> None:
    """TeraPipe over token slices against 1F1B over whole sequences: same sequences, same split."""
    m, seq, slices = args.tera_sequences, args.tera_seq, args.tera_slices
    cfg = bench_model_config()
    torch.manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (m, 1, seq + 1))
    batches = [Batch(d[:, :-1], d[:, 1:]) for d in data]
    runs = {
        label: _executor(rank, world, name, m, n, seq)
        for label, name, n in (("meshtrain TeraPipe", "terapipe", slices), ("meshtrain 1F1B", "1f1b", 1))
    }
    timings = timed_rounds({label: (lambda r=r: r[0](batches)) for label, r in runs.items()}, args.rounds, args.steps)
    notes = []
    for label, (step, ex, schedule, layout, saved) in runs.items():
        saved.peak = saved.live = 0
        step(batches)  # the traced step
        traces, peaks = [None] * world, [0] * world
        dist.all_gather_object(traces, ex.trace)
        dist.all_gather_object(peaks, saved.peak)
        measured = from_trace(traces, chunks=1, slices=layout.slices)
        predicted = simulate(schedule, measured_costs(traces, layout.slices), layout)
        notes.append(
            f"{label}: bubble measured {measured.bubble_rate:.1%}, simulated {predicted.bubble_rate:.1%}; "
            f"peak saved activations {', '.join(f'{p / 2**20:.1f}' for p in peaks)} MiB by rank"
        )
    if rank == 0:
        print(f"TeraPipe: {world} stages x {m} sequence(s) of {seq} tokens, {slices} slices each")
        for note in notes:
            print(note)
        record(
            args, [ratio("PP (TeraPipe)", timings, "meshtrain TeraPipe", "meshtrain 1F1B", m * seq, "; ".join(notes))]
        )


def _setup(rank: int, world: int, args: argparse.Namespace) -> tuple[ModelConfig, list[Batch], list[torch.nn.Module]]:
    """The default model, m random microbatches, and two identical copies of this rank's stage."""
    cfg = bench_model_config()
    m, mb, seq = args.microbatches, args.micro_batch, args.seq
    torch.manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (m, mb, seq + 1))
    ranges = stage_ranges(split_blocks(cfg, world, "params"))
    stages = [build_stage(cfg, rank, ranges[rank], world, torch.device("cpu"), seed=0) for _ in range(2)]
    return cfg, [Batch(x, y) for x, y in zip(data[..., :-1], data[..., 1:])], stages


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
    add_compile_option(p)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument(
        "--rows",
        default="torch,terapipe,2bw",
        help="comma-separated: torch (1F1B vs torch, then ZB-V), terapipe, 2bw (2BW vs 1F1B)",
    )
    p.add_argument("--tera-sequences", type=int, default=2, help="sequences per step in the TeraPipe row")
    p.add_argument(
        "--tera-seq", type=int, default=256, help="tokens per sequence in the TeraPipe row (the model window)"
    )
    p.add_argument("--tera-slices", type=int, default=8, help="token slices per sequence in the TeraPipe row")
    args = p.parse_args()
    rows = args.rows.split(",")
    if args.compile != "none" and set(rows) - {"torch"}:
        p.error("--compile applies to the torch rows (1F1B vs torch, ZB-V); add --rows torch")
    if {"torch", "terapipe"} & set(rows):
        spawn(worker, 2, args)
    if "2bw" in rows:
        spawn(two_bw_worker, 2, args)


if __name__ == "__main__":
    main()
