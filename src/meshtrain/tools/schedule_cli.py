"""`meshtrain schedule`: build, simulate, check, export and plot a pipeline schedule."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any

from meshtrain.pipeline.schedules import SCHEDULES, V_SHAPED, Layout, Schedule, build_schedule, native_chunks, to_csv
from meshtrain.tools.schedule_check import validate_schedule
from meshtrain.tools.simulator import Costs, Prediction, SimResult, closed_form, simulate

_DESCRIPTION = """\
Build a pipeline schedule (or read one from CSV), check that it is complete and cannot deadlock,
and simulate it symbolically: no processes, no GPUs. Prints the bubble rate, each rank's idle
time and peak in-flight activations next to the closed form from the papers.

Costs are per microbatch on a full rank-stage (a chunk of an interleaved rank costs 1/chunks).
Activations are counted in microbatches of a full stage, freed at B.
"""

_EXAMPLES = """\
examples:
  meshtrain schedule --pp 4 --microbatches 8 --schedule 1f1b
  meshtrain schedule --pp 4 --microbatches 8 --schedule interleaved-1f1b --chunks 2 --out 1f1b.png
  meshtrain schedule --pp 4 --microbatches 8 --schedule zb-h1 --costs 2,2,1 --csv-out zb.csv
  meshtrain schedule --pp 4 --microbatches 8 --schedule zb-v --out zb-v.png
  meshtrain schedule --csv-in zb.csv --costs 2,2,1 --out zb.svg
  meshtrain schedule --pp 4 --microbatches 1 --schedule terapipe --slices 8 --out tera.png
"""


def add_parser(subparsers: Any) -> None:
    """Register the `schedule` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "schedule",
        help="simulate a pipeline-parallel schedule and report its bubble",
        description=_DESCRIPTION,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pp", type=int, help="pipeline ranks (required unless --csv-in)")
    parser.add_argument("--microbatches", "-m", type=int, help="microbatches per step (required unless --csv-in)")
    parser.add_argument("--schedule", help=f"one of: {', '.join(SCHEDULES)} (required unless --csv-in)")
    parser.add_argument(
        "--chunks",
        type=int,
        help="virtual stages per rank: interleaved-1f1b's choice (default 1); the V schedules (zb-v) always run 2",
    )
    parser.add_argument(
        "--slices",
        type=int,
        default=1,
        help="token slices per sequence, terapipe only (default 1); costs stay per sequence",
    )
    parser.add_argument("--costs", default="1,1,1", help="T_F,T_B,T_W per microbatch and full stage (default 1,1,1)")
    parser.add_argument("--comm", type=float, default=0.0, help="latency of one point-to-point message (default 0)")
    parser.add_argument(
        "--csv-in",
        help="read a custom schedule from this CSV (columns rank,index,kind,stage,"
        "microbatch,peer); send/recv actions are added if it has none",
    )
    parser.add_argument("--csv-out", help="write the schedule, with its send/recv actions, to this CSV")
    parser.add_argument("--out", help="write a Gantt chart; .png or .svg")
    parser.add_argument(
        "--trace",
        metavar="RUN_DIR",
        help="instead of simulating, read the pipeline trace of a "
        "`meshtrain train` run and compare it with the simulator fed the measured costs",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of the subcommand; returns the exit status (2 for invalid input)."""
    if args.trace:
        return _run_trace(args)
    try:
        costs = Costs.parse(args.costs, args.comm)
        schedule, layout, name, microbatches = _load(args)
        chunks = layout.chunks
        result = simulate(schedule, costs, layout)
        prediction = closed_form(name, len(schedule), microbatches, chunks, costs, layout.slices) if name else None
        if args.csv_out:
            to_csv(schedule, args.csv_out)
        if args.out:
            from meshtrain.tools.plot import plot_schedule

            title = f"{name or args.csv_in}: pp={len(schedule)}, m={microbatches}"
            title += f", v={chunks}" if chunks > 1 else ""
            title += f", {layout.slices} slices" if layout.slices > 1 else ""
            plot_schedule(result, args.out, title)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _report(result, prediction, microbatches, costs)
    return 0


def _load(args: argparse.Namespace) -> tuple[Schedule, Layout, str | None, int]:
    """The validated schedule, its layout, its built-in name (if any) and microbatch count."""
    name = args.schedule
    if name is not None and name not in SCHEDULES:
        close = difflib.get_close_matches(name, SCHEDULES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown schedule {name!r}; {hint}choices: {', '.join(SCHEDULES)}")
    if args.csv_in:
        schedule, layout = build_schedule(args.csv_in, 0, 0)
        microbatches = 1 + max(a.microbatch for actions in schedule for a in actions)
        for flag, given, found in (("--pp", args.pp, layout.pp), ("--microbatches", args.microbatches, microbatches)):
            if given is not None and given != found:
                raise ValueError(f"{flag} {given} disagrees with {args.csv_in}, which has {found}")
        validate_schedule(schedule, layout.pp, layout.chunks, microbatches, layout)
        return schedule, layout, name, microbatches
    missing = [
        flag
        for flag, value in (("--pp", args.pp), ("--microbatches", args.microbatches), ("--schedule", name))
        if value is None
    ]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or give --csv-in)")
    chunks = native_chunks(name, args.chunks)
    if name in V_SHAPED and args.chunks not in (None, chunks):
        raise ValueError(f"--schedule {name} runs {chunks} chunks per rank (a V); drop --chunks {args.chunks}")
    if min(args.pp, args.microbatches, chunks, args.slices) < 1:
        raise ValueError(
            f"--pp, --microbatches, --chunks and --slices must be >= 1 (got {args.pp}, {args.microbatches}, "
            f"{chunks}, {args.slices})"
        )
    schedule, layout = build_schedule(name, args.pp, args.microbatches, chunks, args.slices)
    validate_schedule(schedule, args.pp, chunks, args.microbatches * args.slices, layout)
    return schedule, layout, name, args.microbatches


def _report(result: SimResult, prediction: Prediction | None, microbatches: int, costs: Costs) -> None:
    from rich.console import Console
    from rich.table import Table

    ranks = Table(title="per rank")
    for column in ("rank", "busy", "idle", "idle in own span", "peak activations", "peak (freed at W)"):
        ranks.add_column(column, justify="right")
    for r in range(result.pp):
        ranks.add_row(
            str(r),
            f"{result.busy[r]:g}",
            f"{result.idle[r]:g}",
            f"{result.span_idle[r]:g}",
            f"{result.peak_activations[r]:g}",
            f"{result.peak_until_w[r]:g}",
        )
    summary = Table(title="pipeline")
    for column in ("metric", "simulated", "closed form"):
        summary.add_column(column, justify="right")
    pred = prediction or Prediction(0.0, 0.0, False, False, "")

    def predicted(value: float, holds: bool, fmt: str = "g") -> str:
        # A star marks a closed form whose assumptions the inputs break; the note under the table names them.
        return "n/a" if prediction is None else format(value, fmt) + ("" if holds else " *")

    makespan = microbatches * costs.per_microbatch + pred.bubble_time
    summary.add_row(
        "bubble rate", f"{result.bubble_rate:.2%}", predicted(pred.bubble_rate(microbatches, costs), pred.holds, ".2%")
    )
    summary.add_row("bubble time", f"{result.bubble_time:g}", predicted(pred.bubble_time, pred.holds))
    summary.add_row("bubble, steady state", f"{result.steady_bubble:g}", predicted(pred.bubble_time, pred.holds_steady))
    summary.add_row("makespan", f"{result.makespan:g}", predicted(makespan, pred.holds))
    summary.add_row("peak activations", f"{result.peak:g}", predicted(pred.peak, True))
    note = (
        "custom schedule: no closed form"
        if prediction is None
        else ("" if pred.holds and pred.holds_steady else f"* the closed form assumes {pred.assumption}")
    )
    console = Console(file=sys.stdout)
    console.print(ranks)
    console.print(summary)
    if note:
        console.print(note, soft_wrap=True)


def _run_trace(args: argparse.Namespace) -> int:
    from pathlib import Path

    from meshtrain.tools.trace import compare

    try:
        measured, predicted, meta = compare(Path(args.trace))
        if args.out:
            from meshtrain.tools.plot import plot_schedule

            plot_schedule(measured, args.out, f"measured {meta['schedule']}: pp={meta['pp']}, m={meta['microbatches']}")
    except (ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{meta['schedule']} pp={meta['pp']} m={meta['microbatches']} v={meta['chunks']}: "
        f"measured bubble {measured.bubble_rate:.2%} (makespan {1e3 * measured.makespan:.1f} ms), "
        f"simulated with the measured costs {predicted.bubble_rate:.2%} "
        f"(makespan {1e3 * predicted.makespan:.1f} ms)"
    )
    return 0
