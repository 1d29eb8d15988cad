"""Run every benchmark and write one table, benchmarks/results.md, with the date and the machine.

    python benchmarks/run_all.py [--rounds 15] [--compile-too] [--out benchmarks/results.md]     (or: make bench)

With --compile-too, the benchmarks that have a torch peer and compile with it (COMPILED) run a second time with
`--compile blocks`: both contenders compile every block (ours through training.compile's
apply_compile, the peer as torchtitan does), and the table's compile column says which run a row
comes from, so each ratio is shown with and without compile, each measured in one run.

Each benchmark runs in its own processes and appends its ratios (median, min and max over shuffled
rounds, each against a peer measured in the same run) to a JSON-lines file; this script then
renders them. A shared machine moves absolute tokens/s between runs; the ratios are steadier.
The sections after the table (each a `## ` heading: benchmarks run by hand, such as bench_diloco.py's
half hour) are kept as they are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [  # (script, extra arguments)
    ("bench_dp.py", []),
    ("bench_zero.py", []),
    ("bench_tp.py", []),
    ("bench_tp.py", ["--sp"]),
    ("bench_tp.py", ["--async-tp"]),
    ("bench_pp.py", []),
    ("bench_cp.py", []),
    ("bench_generate.py", []),
]
# the benchmarks with a torch peer, and what their compiled run adds (bench_pp: only its torch-peer rows).
# bench_tp is left out: with torch 2.13 on CPU the DTensor peer's backward fails inside a compiled block
# (AttributeError '_local_tensor' in DTensor's redistribute backward), so there is no fair compiled pair.
COMPILED = {"bench_dp.py": [], "bench_zero.py": [], "bench_pp.py": ["--rows", "torch"]}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, gloo"


def render(rows: list[dict], rounds: int) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Measured {datetime.date.today().isoformat()} on {machine()} by `make bench` "
        f"(benchmarks/run_all.py, {rounds} shuffled rounds per benchmark).",
        "",
        "Each ratio is our tokens/s over the peer's, computed round by round in the same processes; "
        "median (min - max) over the rounds. Peers are configured as their docs recommend (see each "
        "benchmark's docstring).",
        "",
        "| benchmark | compile | ours vs peer | ratio, median (min - max) | ours tokens/s | peer tokens/s | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r.get('compile', 'none')} | {r['ours']} vs {r['peer']} | {r['median']:.3f} ({r['min']:.3f} - "
            f"{r['max']:.3f}) | {r['ours_tokens_per_s']:,.0f} | {r['peer_tokens_per_s']:,.0f} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def kept_sections(path: Path) -> str:
    """The hand-run benchmarks' sections of an existing results file: from its first `## ` heading on."""
    text = path.read_text() if path.exists() else ""
    at = text.find("\n## ")
    return text[at:] if at >= 0 else ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="shuffled rounds per benchmark (15: the ratios settle)")
    p.add_argument("--out", default=str(HERE / "results.md"))
    p.add_argument(
        "--compile-too", action="store_true", help="also run the torch-peer benchmarks with --compile blocks"
    )
    args = p.parse_args()
    runs = list(BENCHMARKS)
    if args.compile_too:
        runs += [
            (script, [*extra, *COMPILED[script], "--compile", "blocks"])
            for script, extra in BENCHMARKS
            if script in COMPILED
        ]
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "rows.jsonl"
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tmp) / "inductor"))
        for script, extra in runs:
            print(f"== {script} {' '.join(extra)}", flush=True)
            cmd = [sys.executable, str(HERE / script), "--rounds", str(args.rounds), "--json", str(results), *extra]
            if subprocess.run(cmd).returncode:
                print(f"error: {script} failed", file=sys.stderr)
                return 1
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    out = Path(args.out)
    out.write_text(render(rows, args.rounds) + kept_sections(out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
