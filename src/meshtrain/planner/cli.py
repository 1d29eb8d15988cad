"""`meshtrain plan`: predict memory, communication and step time; recommend a layout.

The main CLI calls `add_parser(subparsers)`; `main()` runs the subcommand on its own
(`python -m meshtrain.planner ...`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any, Literal, overload

from rich.console import Console

from meshtrain.config import Config, ConfigError, load_config
from meshtrain.model.math import param_count
from meshtrain.pipeline.schedules import SCHEDULES, V_SHAPED
from meshtrain.planner import report
from meshtrain.planner.contention import shared
from meshtrain.planner.errors import PlanError
from meshtrain.planner.evaluate import Workload
from meshtrain.planner.predict import config_layout, config_workload, plan_on, predict_run
from meshtrain.planner.presets import CLUSTERS, MODELS, ClusterSpec, did_you_mean, load_cluster, load_model
from meshtrain.planner.search import SearchOptions, SearchResult, explain, search
from meshtrain.validate import validate

DESCRIPTION = """\
Predict per-device memory, communication and step time for a parallel layout, and rank the
layouts that fit. Three ways to call it:

  search:  meshtrain plan --model llama3-70b --cluster h100-80gb --gpus 512 --global-batch 1024 --seq 8192
  config:  meshtrain plan --config configs/tiny.toml [--nproc 2] [--set training.micro_batch=4]
  sizing:  meshtrain plan --budget 5.76e23   (Chinchilla and Kaplan sizes for a FLOP budget)
"""
EPILOG = f"""\
model presets:   {", ".join(MODELS)} (or a .toml file with a [model] table)
cluster presets: {", ".join(CLUSTERS)} (or a .toml file with a [cluster] table)
Counts accept suffixes K, M, B, T and exponents: --tokens 15T, --budget 3.1e23.
Formulas, conventions and a worked example: docs/planner.md.
"""
SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}


def add_parser(subparsers: Any) -> None:
    """Register `plan` on an argparse subparsers object; it dispatches to `run`."""
    p = subparsers.add_parser(
        "plan",
        help="predict memory and step time; recommend a parallel layout",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to plan")
    what.add_argument("--model", help="model preset or TOML file: search layouts for it")
    what.add_argument("--config", help="a meshtrain run config: estimate that one run")
    what.add_argument("--budget", metavar="FLOPS", help="FLOP budget: print compute-optimal params and tokens")
    where = p.add_argument_group("cluster and workload")
    where.add_argument("--cluster", help="cluster preset or TOML file (default: h100-80gb; cpu with --config)")
    where.add_argument("--gpus", metavar="N", help="devices to plan for (search)")
    where.add_argument("--global-batch", metavar="B", help="sequences per optimizer step (search)")
    where.add_argument("--seq", metavar="S", help="sequence length (default: the model's)")
    where.add_argument(
        "--tokens",
        metavar="T",
        help="training tokens for the 'time for' column (default: 20 x params; the run's own with --config)",
    )
    where.add_argument("--efficiency", metavar="F", help="achievable fraction of peak FLOP/s (default: the cluster's)")
    where.add_argument(
        "--attention",
        choices=("flash", "naive"),
        default="flash",
        help="flash never stores the s x s scores; naive is Korthikanti's 5as^2b (default: flash)",
    )
    cfg = p.add_argument_group("with --config")
    cfg.add_argument(
        "--nproc",
        metavar="N",
        help="world size (default: the product of the parallel degrees, dp_shard=-1 counting as 1)",
    )
    cfg.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)"
    )
    out = p.add_argument_group("search and output")
    out.add_argument("--top", default="10", metavar="K", help="rows in the ranked table (default: 10)")
    out.add_argument(
        "--schedules",
        default="1f1b,interleaved-1f1b",
        metavar="LIST",
        help="pipeline schedules to try, comma-separated (also gpipe, zb-h1, zb-h2; not zb-v)",
    )
    out.add_argument(
        "--zero", default="0,1,2,3", metavar="STAGES", help="ZeRO stages to try, comma-separated (default: 0,1,2,3)"
    )
    out.add_argument("--offload", action="store_true", help="also try ZeRO CPU offload of optimizer state")
    out.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


# whole counts come back as int, fractions (integer=False) as float
@overload
def parse_count(text: str | None, name: str, integer: Literal[True] = True) -> int | None: ...
@overload
def parse_count(text: str | None, name: str, integer: Literal[False]) -> float | None: ...
def parse_count(text: str | None, name: str, integer: bool = True) -> float | None:
    """'15T', '3.1e23', '512' -> a number; a one-line PlanError otherwise."""
    if text is None:
        return None
    raw = text.strip().upper().replace("_", "")
    scale = SUFFIX.get(raw[-1:], 1.0) if raw else 1.0
    try:
        value = float(raw[:-1] if scale != 1.0 else raw) * scale
    except ValueError:
        raise PlanError(f"{name} {text!r} is not a number (suffixes K, M, B, T are allowed)") from None
    if not math.isfinite(value) or value <= 0 or (integer and not value.is_integer()):
        raise PlanError(f"{name} {text!r} must be a positive {'whole ' if integer else ''}number")
    return int(value) if integer else value


def _console() -> Console:
    console = Console()
    # piped output would otherwise wrap the table at 80 columns
    return console if console.is_terminal else Console(width=130)


def _cluster(args: argparse.Namespace, default: str) -> ClusterSpec:
    cluster = load_cluster(args.cluster or default)
    eff = parse_count(args.efficiency, "--efficiency", integer=False)
    if eff is not None:
        if eff > 1:
            raise PlanError(f"--efficiency {args.efficiency} must be a fraction in (0, 1]")
        cluster = dataclasses.replace(cluster, efficiency=eff)
    return cluster


def _search_options(args: argparse.Namespace) -> SearchOptions:
    schedules = tuple(s.strip() for s in args.schedules.split(",") if s.strip())
    for s in schedules:
        if s not in SCHEDULES:
            raise PlanError(f"--schedules: unknown schedule '{s}'" + did_you_mean(s, list(SCHEDULES)))
        if s in V_SHAPED:  # rank 0 holds the first and the last stage; the memory model puts the head on rank pp-1
            raise PlanError(
                f"--schedules: {s} is not searched: its V puts the embedding and the head on pipeline rank 0, "
                f"which the planner's per-rank memory model does not describe; compare it with "
                f"`meshtrain schedule --schedule {s}`"
            )
    stages = tuple(sorted({s.strip() for s in args.zero.split(",") if s.strip()}))
    if not stages or any(s not in ("0", "1", "2", "3") for s in stages):
        raise PlanError(f"--zero {args.zero!r} must list stages from 0, 1, 2, 3, e.g. --zero 0,1")
    return SearchOptions(
        schedules=schedules or ("1f1b",), zero_stages=tuple(int(s) for s in stages), allow_offload=args.offload
    )


def _no_fit_message(result: SearchResult, ws: Workload) -> str:
    smallest = result.smallest
    need = (
        f"; the smallest ({smallest.layout.label()}) needs {report.fmt_bytes(smallest.memory_total)}"
        if smallest
        else ""
    )
    return (
        f"error: no layout of {ws.shape.name} on {ws.n_gpus} x {ws.cluster.name} fits in "
        f"{report.fmt_bytes(ws.cluster.usable_bytes)}{need}; add devices or lower --global-batch/--seq"
    )


def _plan_search(args: argparse.Namespace, console: Console, extra: dict[str, Any]) -> int:
    shape, cluster = load_model(args.model), _cluster(args, "h100-80gb")
    gpus, batch = parse_count(args.gpus, "--gpus"), parse_count(args.global_batch, "--global-batch")
    if gpus is None or batch is None:
        raise PlanError("--model needs --gpus and --global-batch")
    seq = parse_count(args.seq, "--seq") or shape.seq_len
    top = parse_count(args.top, "--top")
    tokens = parse_count(args.tokens, "--tokens") or 20 * param_count(shape)
    ws = Workload(shape, cluster, gpus, batch, seq, attention=args.attention)
    result = search(ws, _search_options(args))
    if not result.ranked:
        print(_no_fit_message(result, ws), file=sys.stderr)
        return 1
    best, why = result.ranked[0], explain(result.ranked)
    if args.json:
        print(
            json.dumps(
                {
                    "model": dataclasses.asdict(shape),
                    "cluster": dataclasses.asdict(cluster),
                    "gpus": gpus,
                    "global_batch": batch,
                    "seq_len": seq,
                    "tokens": tokens,
                    "attention": args.attention,
                    "considered": result.considered,
                    "fit": len(result.ranked),
                    "layouts": [report.plan_dict(p, tokens) for p in result.ranked[:top]],
                    "why": why,
                    **extra,
                },
                indent=2,
            )
        )
        return 0
    title = (
        f"{shape.name} ({report.fmt_count(param_count(shape))} params) on {gpus} x {cluster.name}, "
        f"batch {batch} x {seq}: {len(result.ranked)} of {result.considered} layouts fit"
    )
    console.print(report.ranked_table(result.ranked[:top], tokens, title))
    console.print(report.breakdown_table(best, cluster.usable_bytes))
    console.print(f"[bold]why:[/] {why}")
    return 0


def default_world(cfg: Config) -> int:
    """The smallest world a config describes: the product of its degrees, dp_shard=-1 counting as 1."""
    p = cfg.parallel
    return p.dp_replicate * max(p.dp_shard, 1) * p.cp * p.tp * p.pp


def _config_workload(args: argparse.Namespace, cfg: Config, world: int) -> Workload:
    cluster = _cluster(args, "cpu")
    # the run's own peak stands in for the default cluster's, never for one the user names
    if cfg.logging.peak_tflops > 0 and not args.cluster:
        cluster = dataclasses.replace(cluster, peak_tflops=cfg.logging.peak_tflops)
    ws = config_workload(cfg, world, shared(cluster, world), attention=args.attention)
    return dataclasses.replace(ws, shape=dataclasses.replace(ws.shape, name=args.config))


def _plan_config(args: argparse.Namespace, console: Console, extra: dict[str, Any]) -> int:
    cfg = load_config(args.config, args.set)
    world = parse_count(args.nproc, "--nproc") or default_world(cfg)
    pred = predict_run(cfg, world)
    cfg = validate(cfg, world)
    t = cfg.training
    tokens = parse_count(args.tokens, "--tokens") or t.steps * t.global_batch * t.seq_len
    ws = _config_workload(args, cfg, world)
    plan = plan_on(ws, config_layout(cfg))
    if args.json:
        print(
            json.dumps(
                {
                    "config": args.config,
                    "cluster": dataclasses.asdict(ws.cluster),
                    "tokens": tokens,
                    "prediction": pred,
                    "plan": report.plan_dict(plan, tokens),
                    **extra,
                },
                indent=2,
            )
        )
        return 0
    console.print(
        f"[bold]{args.config}[/] on {world} x {ws.cluster.name}: {plan.layout.label()}, "
        f"{report.fmt_count(pred['n_params'])} params, {report.fmt_seconds(plan.step_time)}/step, "
        f"{report.fmt_count(plan.tokens_per_s)} tokens/s, MFU {plan.mfu:.1%}, "
        f"{report.fmt_seconds(tokens / plan.tokens_per_s)} for {report.fmt_count(tokens)} tokens"
    )
    if not plan.fits:
        console.print(
            f"[bold red]does not fit:[/] needs {report.fmt_bytes(plan.memory_total)} "
            f"of {report.fmt_bytes(ws.cluster.usable_bytes)}"
        )
    console.print(report.breakdown_table(plan, ws.cluster.usable_bytes))
    console.print(report.predictions_table(pred))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.model and args.config:
        raise PlanError("pass either --model (search layouts) or --config (one run), not both")
    if not (args.model or args.config or args.budget):
        raise PlanError("nothing to plan: pass --model with --gpus and --global-batch, --config, or --budget")
    budget = parse_count(args.budget, "--budget", integer=False)
    extra = {"sizing": report.sizing_rows(budget)} if budget else {}
    console = _console()
    rc = 0
    if args.model:
        rc = _plan_search(args, console, extra)
    elif args.config:
        rc = _plan_config(args, console, extra)
    elif args.json:
        print(json.dumps(extra, indent=2))
    if budget and not args.json:
        console.print(report.sizing_table(budget))
    return rc


def run(args: argparse.Namespace) -> int:
    """Run `meshtrain plan`; bad input prints one `error: ...` line to stderr and returns 2."""
    try:
        return _run(args)
    except ConfigError as e:  # PlanError included
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshtrain")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
