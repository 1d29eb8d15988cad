"""How long training stands still for a checkpoint: synchronous saves against asynchronous ones.

Trains the default model on 2 ranks through the CLI, once with `checkpoint.async_save=false` and
once with `true`, saving every `--interval` steps, and reads RUN_DIR/saves.jsonl: for each save, the
seconds the training loop waited. An asynchronous save waits for the state to be staged and for the
previous save to be committed; the files are written while training goes on. The contenders run in
alternating order over `--rounds`; medians and ranges are printed.

    python benchmarks/bench_checkpoint.py [--rounds 2] [--steps 40] [--interval 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stalls(run_dir: Path, steps: int, interval: int, async_save: bool) -> tuple[list[float], float]:
    args = [
        sys.executable,
        "-m",
        "meshtrain",
        "train",
        "--config",
        str(ROOT / "configs" / "default.toml"),
        "--nproc",
        "2",
        "--run-dir",
        str(run_dir),
    ]
    for item in (
        f"training.steps={steps}",
        f"checkpoint.interval={interval}",
        "checkpoint.keep=2",
        f"checkpoint.async_save={str(async_save).lower()}",
        "data.source=synthetic",
        "logging.progress=false",
        "logging.sample_prompt=",
    ):
        args += ["--set", item]
    subprocess.run(args, check=True, capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    saves = [json.loads(line) for line in (run_dir / "saves.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_time = statistics.median(r["step_time_s"] for r in records)
    return [s["stall_s"] for s in saves], step_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--json", help="append the result to this file (one JSON object per line)")
    args = p.parse_args()
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    step_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["sync", "async"] if r % 2 == 0 else ["async", "sync"]
            for kind in order:
                got, step = _stalls(Path(tmp) / f"{kind}{r}", args.steps, args.interval, kind == "async")
                stalls[kind] += got
                step_times.append(step)
    sync, asyn = statistics.median(stalls["sync"]), statistics.median(stalls["async"])
    print(
        f"default model (1.67M params, 26.8 MB of model and optimizer state per rank), 2 gloo ranks, "
        f"{len(stalls['sync'])} saves each; median step {statistics.median(step_times):.3f} s"
    )
    for kind, values in stalls.items():
        print(
            f"  {kind:5} stall per save: median {statistics.median(values):.3f} s "
            f"(min {min(values):.3f}, max {max(values):.3f})"
        )
    print(f"async stalls training {sync / asyn:.1f}x less than sync")
    if args.json:
        with open(args.json, "a") as f:
            f.write(
                json.dumps(
                    {
                        "benchmark": "checkpoint stall",
                        "ours": "async save",
                        "peer": "sync save",
                        "median": sync / asyn,
                        "min": min(stalls["sync"]) / max(stalls["async"]),
                        "max": max(stalls["sync"]) / min(stalls["async"]),
                        "ours_tokens_per_s": 0.0,
                        "peer_tokens_per_s": 0.0,
                        "note": f"stall per save: sync {sync:.3f} s, async {asyn:.3f} s (median)",
                    }
                )
                + "\n"
            )


if __name__ == "__main__":
    main()
