"""The planner's step time against measured runs: `python3 benchmarks/planner_fidelity.py`.

For every layout of issue 16 item 3 (DP, ZeRO-1, ZeRO-3, TP with and without SP, PP under 1F1B and
ZB-H1, two compositions) on 2 and 4 ranks, it trains configs/default.toml's model for a few steps
through the Trainer `meshtrain train` runs (one pool of gloo processes, a fresh process group per
run) and takes the median `step_time_s` of the steps after the warm-up, every rank's slowest. The
prediction is `meshtrain.planner.predict.predict_step_time` for the same config on a cluster
calibrated *before* the runs by microbenchmarks that never run the model (`meshtrain bench-comm
--calibrate`, or `--cluster FILE` per world size), so a good agreement is a result, not a fit.

The runs go in a shuffled order (printed). The load average before and after is printed with the
table, since a busy machine slows the runs and not the prediction. `--markdown` prints the table
docs/planner.md carries.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "default.toml"
BASE = [
    "data.source=synthetic",
    "checkpoint.interval=0",
    "logging.sample_prompt=",
    "logging.progress=false",
    "logging.peak_tflops=1.0",
    "logging.log_interval=1",
    "training.warmup_steps=1",
]
# (name, ranks, overrides); default.toml's model: dim 192, 4 layers, 6 heads (2 kv), seq 128, batch 16
LAYOUTS: list[tuple[str, int, list[str]]] = [
    ("dp2", 2, []),
    ("zero1 dp2", 2, ["parallel.zero_stage=1"]),
    ("zero3 dp2", 2, ["parallel.zero_stage=3"]),
    ("tp2", 2, ["parallel.tp=2"]),
    ("tp2 sp", 2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    ("pp2 1f1b", 2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    ("pp2 zb-h1", 2, ["parallel.pp=2", "parallel.pp_schedule=zb-h1"]),
    ("dp4", 4, []),
    ("zero1 dp4", 4, ["parallel.zero_stage=1"]),
    ("zero3 dp4", 4, ["parallel.zero_stage=3"]),
    ("tp2 sp x dp2", 4, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    ("pp2 1f1b x dp2", 4, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    ("pp4 zb-h1", 4, ["parallel.pp=4", "parallel.pp_schedule=zb-h1"]),
    ("tp2 x pp2", 4, ["parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule=1f1b"]),
]
WARMUP = 2


def overrides(extra: list[str], steps: int) -> list[str]:
    return [*BASE, f"training.steps={steps}", *extra]


def measured_median(records: list[dict], warmup: int = WARMUP) -> float:
    """Median over the steps after `warmup` of the slowest rank's step time (a step waits for it)."""
    times = [r.get("step_time_max_s", r["step_time_s"]) for r in records if r["step"] > warmup]
    if not times:
        raise RuntimeError(f"no steps after the {warmup} warm-up steps: raise --steps")
    return statistics.median(times)


def predicted(name_overrides: list[str], nproc: int, cluster: Any, steps: int) -> float:
    from meshtrain.config import load_config
    from meshtrain.planner.predict import predict_step_time

    cfg = load_config(CONFIG, overrides(name_overrides, steps))
    return float(predict_step_time(cfg, nproc, cluster)["step_time_s"])


def calibrate(nproc: int, out: Path) -> Path:
    """`meshtrain bench-comm --nproc N --calibrate out` with the quick sweep the planner needs."""
    import subprocess

    cmd = [sys.executable, "-m", "meshtrain", "bench-comm", "--nproc", str(nproc), "--calibrate", str(out)]
    cmd += ["--sizes", "1K:4M", "--iters", "5", "--ops", "all_reduce,all_gather,reduce_scatter,send_recv"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"calibration failed:\n{proc.stderr[-3000:]}")
    return out


def train(runs: list[tuple[str, int, list[str]]], steps: int, tmp: Path) -> dict[str, float]:
    """Each run's measured median step time. Runs of one world size share one pool of exactly that
    many processes: a spare rank of a bigger pool would poll its store on a core the run needs."""
    sys.path.insert(0, str(ROOT / "tests"))
    from dist_utils import Run, read_metrics, train_runs

    out: dict[str, float] = {}
    for n in dict.fromkeys(k for _, k, _ in runs):
        mine = [
            (name, Run(tmp / name.replace(" ", "_"), k, overrides(extra, steps), config=CONFIG))
            for name, k, extra in runs
            if k == n
        ]
        saved = os.dup(1)
        with open(os.devnull, "w") as quiet:  # the trainer's log lines would bury the table
            os.dup2(quiet.fileno(), 1)
            try:
                train_runs([run for _, run in mine])
            finally:
                os.dup2(saved, 1)
                os.close(saved)
        out.update({name: measured_median(read_metrics(run.run_dir)) for name, run in mine})
    return out


def table(rows: list[dict], markdown: bool) -> list[str]:
    head = ("layout", "ranks", "predicted ms", "measured ms", "error", "rounds' range ms")
    fmt = [
        (
            r["layout"],
            str(r["ranks"]),
            f"{r['predicted_s'] * 1e3:.0f}",
            f"{r['measured_s'] * 1e3:.0f}",
            f"{r['error']:+.0%}",
            f"{min(r['rounds_s']) * 1e3:.0f}-{max(r['rounds_s']) * 1e3:.0f}",
        )
        for r in rows
    ]
    if markdown:
        return [
            "| " + " | ".join(head) + " |",
            "|---|---|---|---|---|---|",
            *("| " + " | ".join(f) + " |" for f in fmt),
        ]
    return [f"{head[0]:>16} {head[1]:>5} {head[2]:>12} {head[3]:>12} {head[4]:>7} {head[5]:>17}"] + [
        f"{a:>16} {b:>5} {c:>12} {d:>12} {e:>7} {f:>17}" for a, b, c, d, e, f in fmt
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--steps", type=int, default=7, help=f"steps per run; the first {WARMUP} are warm-up")
    p.add_argument("--rounds", type=int, default=1, help="times each layout is trained (medians are pooled)")
    p.add_argument(
        "--cluster", help="a TOML from `meshtrain bench-comm --nproc 4 --calibrate` (default: calibrate now)"
    )
    p.add_argument("--only", default="", help="comma-separated layout names (default: all)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown (docs/planner.md)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from meshtrain.planner.presets import load_cluster

    chosen = [x for x in LAYOUTS if not args.only or x[0] in args.only.split(",")]
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        # one calibration at the largest world serves every run: smaller ones go through contention.py
        top = max(n for _, n, _ in chosen)
        cluster = load_cluster(args.cluster or str(calibrate(top, Path(tmp) / f"cal{top}.toml")))
        shuffle, start = random.Random(args.seed), time.perf_counter()
        got: dict[str, list[float]] = {}
        for i in range(args.rounds):
            part = list(chosen)
            shuffle.shuffle(part)  # every round trains every layout once, in an order of its own
            print(f"# round {i} order: " + ", ".join(name for name, _, _ in part), file=sys.stderr)
            for name, t in train(part, args.steps, Path(tmp) / f"round{i}").items():
                got.setdefault(name, []).append(t)
    load.append(os.getloadavg()[0])
    rows = []
    for name, n, extra in chosen:
        pred, meas = predicted(extra, n, cluster, args.steps), statistics.median(got[name])
        rows.append(
            {
                "layout": name,
                "ranks": n,
                "predicted_s": pred,
                "measured_s": meas,
                "error": pred / meas - 1,
                "rounds_s": got[name],
            }
        )
    note = f"load average {load[0]:.2f} before, {load[1]:.2f} after; runs {time.perf_counter() - start:.0f} s"
    if args.json:
        print(json.dumps({"rows": rows, "load_average": load}, indent=2))
    else:
        print("\n".join(table(rows, args.markdown)))
        print(f"\n{note}; worst |error| {max(abs(r['error']) for r in rows):.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
