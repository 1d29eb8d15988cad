"""`meshtrain plot`: a run's metrics as PNGs, read from RUN_DIR/metrics.jsonl and metrics.rank{R}.jsonl.

loss.png        training loss per step, validation loss where it was evaluated
throughput.png  tokens/s and MFU per step
memory.png      per rank at the last step: model states, gathered ZeRO-3 peak, peak CUDA, peak RSS
comm.png        bytes handed to collectives by kind: per step (rank 0) and per rank over the run

"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshtrain.accounting import KINDS, human_bytes

Records = list[dict[str, Any]]
Figure = Any  # matplotlib.figure.Figure, imported lazily

# one colour per communication kind, stable across figures
KIND_COLOURS = dict(zip(KINDS, ("#3b6fb6", "#e08a2b", "#4fa85a", "#9a5fb8", "#c94c4c", "#7f7f7f")))
MEMORY = (  # (record key, label, colour): a figure keeps its colour whichever others a run has
    ("mem_model_state_bytes", "model states (params, grads, optimizer)", "#3b6fb6"),
    ("zero3_peak_gathered_bytes", "ZeRO-3 gathered parameters (peak)", "#9a5fb8"),
    ("peak_cuda_bytes", "peak CUDA allocated", "#4fa85a"),
    ("peak_rss_bytes", "peak host RSS (process)", "#e08a2b"),
)


def add_parser(subparsers: Any) -> None:
    """Register the `plot` subcommand (meshtrain.cli's LAZY table)."""
    p = subparsers.add_parser(
        "plot",
        help="draw a run's loss, throughput, memory and traffic as PNGs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", required=True, help="folder of a `meshtrain train` run (its metrics.jsonl)")
    p.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/plots)")
    p.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "plots"
    for path in plot_run(run_dir, out):
        print(path)
    return 0


def read_records(path: Path) -> Records:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rank_records(run_dir: Path) -> dict[int, Records]:
    """Every rank's own records (metrics.rank{R}.jsonl), by rank."""
    ranks = {}
    for path in run_dir.glob("metrics.rank*.jsonl"):
        rank = path.name.removeprefix("metrics.rank").removesuffix(".jsonl")
        if rank.isdigit():
            ranks[int(rank)] = read_records(path)
    return dict(sorted(ranks.items()))


def plot_run(run_dir: Path, out: Path) -> list[Path]:
    """Write the four PNGs for the run in `run_dir` into `out`; returns their paths."""
    from meshtrain.config import ConfigError

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file() or not (records := read_records(metrics)):
        raise ConfigError(f"--run-dir {run_dir} has no metrics.jsonl records; train there first")
    per_rank = rank_records(run_dir) or {0: records}
    out.mkdir(parents=True, exist_ok=True)
    title = run_dir.resolve().name
    drawers: dict[str, Callable[[Figure], None]] = {
        "loss": lambda fig: draw_loss(fig, records),
        "throughput": lambda fig: draw_throughput(fig, records),
        "memory": lambda fig: draw_memory(fig, per_rank),
        "comm": lambda fig: draw_comm(fig, records, per_rank),
    }
    paths = []
    for name, draw in drawers.items():
        fig = _figure(name)
        draw(fig)
        fig.suptitle(f"{title}: {fig.get_label()}", fontsize=11)
        fig.savefig(out / f"{name}.png", dpi=110)
        paths.append(out / f"{name}.png")
    return paths


def _figure(name: str) -> Figure:
    # Figure + Agg canvas, not pyplot: no global backend state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    labels = {
        "loss": "loss",
        "throughput": "throughput",
        "memory": "memory per rank",
        "comm": "communication",
    }
    fig = MplFigure(figsize=(11 if name == "comm" else 8, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    fig.set_label(labels[name])
    return fig


UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def byte_unit(largest: float) -> tuple[str, float]:
    """The binary unit an axis reaching `largest` bytes reads best in, and its size: ticks then fall
    on round numbers of it (10 KiB, 20 KiB) rather than on round numbers of bytes."""
    power = 0
    while largest >= 1024 and power < len(UNITS) - 1:
        largest /= 1024
        power += 1
    return UNITS[power], 1024.0**power


def _log_bytes_axis(axis: Any) -> None:
    """Log ticks at powers of 4 (1 MiB, 4 MiB, 16 MiB, ...), named in binary units."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=4))
    axis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v).replace(".0 ", " ")))
    axis.set_minor_formatter(NullFormatter())


def draw_loss(fig: Figure, records: Records) -> None:
    ax = fig.add_subplot()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], color="#3b6fb6", lw=1.6, label="training loss (this step's batch)")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot(
            [r["step"] for r in val],
            [r["val_loss"] for r in val],
            color="#e08a2b",
            lw=1.6,
            marker="o",
            ms=5,
            label="validation loss",
        )
        last = val[-1]
        ax.annotate(
            f"{last['val_loss']:.3f} (ppl {last['val_ppl']:.1f})",
            (last["step"], last["val_loss"]),
            textcoords="offset points",
            xytext=(-4, -16),
            ha="right",
            fontsize=9,
            color="#a55a10",
        )
    skipped = [r for r in records if r.get("skipped")]
    if skipped:
        ax.scatter(
            [r["step"] for r in skipped], [r["loss"] for r in skipped], color="#c94c4c", zorder=3, label="skipped step"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")


def draw_throughput(fig: Figure, records: Records) -> None:
    steps = [r["step"] for r in records]
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(steps, [r["tokens_per_s"] for r in records], color="#3b6fb6", lw=1.4)
    top.set_ylabel("tokens / s (global)")
    top.ticklabel_format(axis="y", style="plain")
    bottom.plot(steps, [100 * r["mfu"] for r in records], color="#4fa85a", lw=1.4)
    bottom.set_ylabel("MFU (%)")
    bottom.set_xlabel("optimizer step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    if len(records) > 1:  # the first step pays for warm-up: say what the steady state is
        rest = records[1:]
        tps = sum(r["tokens_per_s"] for r in rest) / len(rest)
        mfu = 100 * sum(r["mfu"] for r in rest) / len(rest)
        top.axhline(tps, color="#3b6fb6", ls="--", lw=0.8, label=f"mean after step 1: {tps:,.0f} tok/s")
        bottom.axhline(mfu, color="#4fa85a", ls="--", lw=0.8, label=f"mean after step 1: {mfu:.3g} %")
        top.legend(loc="lower right", fontsize=9)
        bottom.legend(loc="lower right", fontsize=9)


def draw_memory(fig: Figure, per_rank: dict[int, Records]) -> None:
    """Grouped bars, one group per rank, on a log scale: model states are often 100x below the RSS."""
    ax = fig.add_subplot()
    ranks = list(per_rank)
    present = [entry for entry in MEMORY if any(entry[0] in recs[-1] for recs in per_rank.values())]
    width = 0.8 / max(len(present), 1)
    for i, (key, label, colour) in enumerate(present):
        values = [per_rank[r][-1].get(key, 0) for r in ranks]
        xs = [r + (i - (len(present) - 1) / 2) * width for r in range(len(ranks))]
        bars = ax.bar(xs, values, width, label=label, color=colour)
        ax.bar_label(bars, [human_bytes(v) if v else "" for v in values], fontsize=7, rotation=90, padding=2)
    ax.set_yscale("log")
    _log_bytes_axis(ax.yaxis)
    smallest = min((v for recs in per_rank.values() for k, *_ in present if (v := recs[-1].get(k, 0)) > 0), default=1)
    ax.set_ylim(bottom=smallest / 4, top=ax.get_ylim()[1] * 8)  # every bar visible, room for labels above
    ax.set_xticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_ylabel(f"bytes at step {per_rank[ranks[0]][-1]['step']} (log scale)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def draw_comm(fig: Figure, records: Records, per_rank: dict[int, Records]) -> None:
    """Left: rank 0's payload bytes per step, stacked by kind, evaluation's on top (hatched);
    right: each rank's training total over the run, by kind."""
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    kinds = [k for k in KINDS if any(r.get(f"comm_{k}_bytes", 0) for recs in per_rank.values() for r in recs)]
    if not kinds:
        for ax in (left, right):
            ax.text(0.5, 0.5, "no communication\n(one process)", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        return
    steps, ranks = [r["step"] for r in records], list(per_rank)
    evals = [sum(r.get(f"val_comm_{k}_bytes", 0) for k in KINDS) for r in records]
    step_totals = [sum(r.get(f"comm_{k}_bytes", 0) for k in kinds) for r in records]
    rank_totals = [sum(r.get(f"comm_{k}_bytes", 0) for k in kinds for r in per_rank[rank]) for rank in ranks]
    step_name, step_unit = byte_unit(max(a + b for a, b in zip(step_totals, evals)))
    rank_name, rank_unit = byte_unit(max(rank_totals))
    base_step, base_rank = [0.0] * len(records), [0.0] * len(ranks)
    for kind in kinds:
        key, colour = f"comm_{kind}_bytes", KIND_COLOURS[kind]
        per_step = [r.get(key, 0) / step_unit for r in records]
        left.bar(steps, per_step, bottom=base_step, color=colour, label=kind.replace("_", "-"))
        base_step = [a + b for a, b in zip(base_step, per_step)]
        totals = [sum(r.get(key, 0) for r in per_rank[rank]) / rank_unit for rank in ranks]
        right.bar(range(len(ranks)), totals, bottom=base_rank, color=colour)
        base_rank = [a + b for a, b in zip(base_rank, totals)]
    if any(evals):
        scaled = [e / step_unit for e in evals]
        left.bar(steps, scaled, bottom=base_step, color="white", edgecolor="#555555", hatch="///", label="evaluation")
    left.set_xlabel("optimizer step")
    left.set_ylabel(f"payload per step, rank 0 ({step_name})")
    right.set_xticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    right.set_ylabel(f"training payload over {len(records)} steps ({rank_name})")
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    left.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=len(kinds) + 1, frameon=False)
