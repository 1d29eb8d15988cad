"""PipeDream-2BW against 1F1B on the default run: loss and throughput per step, as one plot.

Trains configs/default.toml on 2 pipeline stages (2 ranks) with each schedule in turn (or reads two
finished runs with --runs), and draws docs/img/2bw-tradeoff.png: the training loss per step (2BW's
is each batch's at weights one version old) and tokens/s per step (a running median), with the
medians over the second half of the run in the legend.
    python benchmarks/plot_2bw.py [--steps 150] [--runs DIR] [--out docs/img/2bw-tradeoff.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import ROOT, train_default

SCHEDULES = ("1f1b", "2bw")
COLOURS = {"1f1b": "#3b6fb6", "2bw": "#e08a2b"}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _running_median(values: list[float], width: int = 9) -> list[float]:
    half = width // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, tps_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, recs in runs.items():
        steps = [r["step"] for r in recs]
        half = recs[len(recs) // 2 :]
        loss = statistics.mean(r["loss"] for r in recs[-10:])
        tps = statistics.median(r["tokens_per_s"] for r in half)
        loss_ax.plot(steps, [r["loss"] for r in recs], color=COLOURS[name], lw=1, label=f"{name} (last 10: {loss:.3f})")
        tps_ax.plot(
            steps,
            _running_median([r["tokens_per_s"] for r in recs]),
            color=COLOURS[name],
            lw=1,
            label=f"{name} (median, 2nd half: {tps:,.0f})",
        )
    loss_ax.set(xlabel="step", ylabel="training loss", title="loss per step", yscale="log")
    tps_ax.set(xlabel="step", ylabel="tokens/s (running median of 9)", title="throughput (2 CPU ranks, shared machine)")
    for ax in (loss_ax, tps_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("PipeDream-2BW vs 1F1B: default config, pp = 2, m = 4 microbatches")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--runs", type=Path, help="a folder holding finished runs 1f1b/ and 2bw/ (skip training)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_2bw")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "2bw-tradeoff.png")
    args = p.parse_args()
    if args.runs is None:
        for name in SCHEDULES:
            overrides = ["parallel.pp=2", f"parallel.pp_schedule={name}", f"training.steps={args.steps}"]
            train_default(args.work / name, 2, [*overrides, "checkpoint.resume=never"])
    root = args.runs or args.work
    runs = {name: _records(root / name) for name in SCHEDULES}
    for name, recs in runs.items():
        half = recs[len(recs) // 2 :]
        print(
            f"{name}: final loss {recs[-1]['loss']:.4f}, mean of the last 10 {statistics.mean(r['loss'] for r in recs[-10:]):.4f}, "
            f"median tokens/s over the second half {statistics.median(r['tokens_per_s'] for r in half):,.0f}"
        )
    plot(runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
