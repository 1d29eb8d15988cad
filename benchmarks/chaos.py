"""Kill tests with real kills: SIGKILL a random worker at a random moment, let the elastic agent
restart the job, and compare the result with an uninterrupted run, bit for bit.

Each trial starts `meshtrain train --max-restarts 3` on the tiny model (checkpoints every few
steps), waits a random time, then sends SIGKILL to a random worker process from outside (this is
not the fault injector: nothing in the run knows it is coming). The agent stops the other workers
and restarts all of them; they resume from the newest complete checkpoint. The trial counts as
identical when the final metrics.jsonl has every step once and its losses and gradient norms equal
the uninterrupted run's exactly. A kill that lands after the run finished is retried earlier.

    python benchmarks/chaos.py [--trials 20] [--layouts dp,zero3,pp] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
RUN = [
    "training.steps=40",
    "checkpoint.interval=5",
    "checkpoint.keep=2",
    "training.micro_batch=2",
    "model.n_layers=4",
    "logging.progress=false",
]
LAYOUTS = {  # name: overrides (2 ranks each)
    "dp": [],
    "zero3": ["parallel.zero_stage=3"],
    "pp": ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
}


def _command(run_dir: Path, overrides: list[str], restarts: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "meshtrain",
        "train",
        "--config",
        str(TINY),
        "--nproc",
        "2",
        "--run-dir",
        str(run_dir),
        "--max-restarts",
        str(restarts),
        "--resume",
    ]
    for item in RUN + overrides:
        cmd += ["--set", item]
    return cmd


def _records(run_dir: Path) -> list[tuple[int, float, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, lines)]


def _workers(run_dir: Path) -> list[int]:
    """PIDs of this run's worker processes (their command line names the run's config file)."""
    marker = str(run_dir / "config.toml")
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if "meshtrain.train" in args and marker in args:
            out.append(int(entry.name))
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def straight(root: Path, overrides: list[str]) -> tuple[list[tuple[int, float, float]], float, float]:
    """The uninterrupted run's records, and when (seconds after launch) it wrote its first and last."""
    run_dir = root / "straight"
    start = time.monotonic()
    proc = subprocess.Popen(
        _command(run_dir, overrides, 0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT
    )
    steps = int(next(o for o in RUN if o.startswith("training.steps=")).split("=")[1])
    first = last = 0.0
    while proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        lines = metrics.read_text().count("\n") if metrics.is_file() else 0
        if lines and not first:
            first = time.monotonic() - start
        if lines == steps and not last:
            last = time.monotonic() - start
        time.sleep(0.01)
    if proc.returncode != 0 or not first:
        raise RuntimeError("the uninterrupted run failed")
    return _records(run_dir), first, last or time.monotonic() - start


def trial(
    root: Path, name: str, overrides: list[str], reference: list, window: tuple[float, float], rng: random.Random
) -> str:
    """'identical', 'different: ...', or 'missed' (the run ended before the kill). The kill lands at a
    uniformly random moment of the training (between the uninterrupted run's first and last records)."""
    run_dir = root / name
    proc = subprocess.Popen(
        _command(run_dir, overrides, 3),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
        cwd=ROOT,
        text=True,
    )
    time.sleep(rng.uniform(*window))
    victims = _workers(run_dir)
    if not victims or proc.poll() is not None:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            return f"different: exit {proc.returncode} before the kill: {out.strip().splitlines()[-1:]}"
        return "missed"
    victim = rng.choice(victims)
    os.kill(victim, signal.SIGKILL)
    err, _ = proc.communicate(timeout=600)  # stdout and stderr together
    if proc.returncode != 0:
        print("\n".join(err.splitlines()[-40:]), file=sys.stderr)
        errors = [line for line in err.splitlines() if "Error" in line or line.startswith("error")]
        return f"different: exit {proc.returncode}: {' | '.join(errors[-3:])}"
    got = _records(run_dir)
    if got == reference:
        resumed = re.findall(r"resumed from \S*step_(\d+)", err)
        return (
            f"identical (killed pid {victim}; resumed from step {int(resumed[-1])})"
            if resumed
            else f"identical (killed pid {victim} before the first checkpoint; restarted from step 0)"
        )
    steps = [s for s, *_ in got]
    missing = sorted({s for s, *_ in reference} - set(steps))
    twice = sorted({s for s in steps if steps.count(s) > 1})
    unequal = [r[0] for r, g in zip(reference, got) if r != g][:3]
    return f"different: {len(steps)} records, missing {missing}, repeated {twice}, first unequal steps {unequal}"


def run_layout(name: str, trials: int, rng: random.Random) -> tuple[int, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reference, first, end = straight(root, LAYOUTS[name])
        results = []
        for t in range(trials):
            window = (first, end)
            for attempt in range(8):
                outcome = trial(root, f"trial{t}-{attempt}", LAYOUTS[name], reference, window, rng)
                if outcome != "missed":
                    break
                # The run finished before the kill (a loaded machine runs faster or slower than the
                # uninterrupted run did): no trial. Retry, drawing from the earlier part of the window.
                window = (first, first + (window[1] - first) * 0.7)
            results.append(outcome)
            print(f"  {name} trial {t + 1}: {outcome}", flush=True)
        return sum(r.startswith("identical") for r in results), results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20, help="kills per layout (default 20)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill times and victims")
    p.add_argument("--steps", type=int, default=40, help="training steps of every run, checkpointed every 5 (40)")
    args = p.parse_args()
    RUN[0] = f"training.steps={args.steps}"  # the runs' one knob: shorter runs, the same kills
    rng = random.Random(args.seed)
    failed = False
    for name in args.layouts.split(","):
        identical, results = run_layout(name, args.trials, rng)
        resumed = sum("resumed from step" in r for r in results)
        print(f"{name}: {identical}/{args.trials} identical ({resumed} resumed from a checkpoint)", flush=True)
        failed |= identical != args.trials
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
