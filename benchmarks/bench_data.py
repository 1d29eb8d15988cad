"""Peak memory of training on data larger than it should hold: memory-mapped shards against RAM.

Writes prepared token data (`meshtrain prepare-data`'s format, through its ShardWriter) of random
uint16 tokens straight to a temporary folder: a large corpus (default 540M tokens, 1.08 GB) and one
a tenth of its size. Then trains the tiny model (configs/tiny.toml) a few steps on each through the
CLI with data.source=tokens, and once on the in-memory source (data.source=files) with as many
tokens as the small corpus, and prints each run's peak RSS (the worker's ru_maxrss, metrics.jsonl).
The memory-mapped runs should be flat in the corpus size; the in-memory one holds the corpus as
int64 (8 bytes a token) plus the text and the intermediates it was made from. Everything generated
is deleted at the end.

    python benchmarks/bench_data.py [--tokens 540000000] [--steps 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from meshtrain.data.shard_writer import ShardWriter
from meshtrain.data.shards import claim_output, write_meta
from meshtrain.data.tokenizer import BYTE_EOS

DOC_TOKENS = 4096  # document length, EOS included: the index has one entry per document


def write_corpus(root: Path, n_tokens: int, seed: int) -> float:
    """Random byte-vocabulary tokens in documents of DOC_TOKENS; returns the seconds taken."""
    start = time.perf_counter()
    claim_output(root, overwrite=False)
    rng = np.random.default_rng(seed)
    writer = ShardWriter(root, "train", "uint16", shard_tokens=100_000_000)
    # 8M tokens a write: this process stays small, and Linux's ru_maxrss, which a child inherits
    # from its parent across fork and exec, would otherwise raise the floor of every figure below
    chunk = 2048 * DOC_TOKENS
    for lo in range(0, n_tokens, chunk):
        tokens = rng.integers(1, 256, size=min(chunk, n_tokens - lo), dtype=np.uint16)
        lengths = np.full(-(-len(tokens) // DOC_TOKENS), DOC_TOKENS, dtype=np.int64)
        lengths[-1] = len(tokens) - DOC_TOKENS * (len(lengths) - 1)
        tokens[np.cumsum(lengths) - 1] = BYTE_EOS
        writer.add(tokens, lengths)
    splits = {"train": writer.close(), "val": ShardWriter(root, "val", "uint16", 1).close()}
    write_meta(root, {"dtype": "uint16", "vocab_size": 256, "eos_id": BYTE_EOS, "tokenizer": "byte", "splits": splits})
    return time.perf_counter() - start


def write_text(path: Path, n_bytes: int, seed: int) -> None:
    """A text file of printable ASCII (one byte, so one token, per character), written in chunks."""
    rng = np.random.default_rng(seed)
    with path.open("wb") as f:
        for lo in range(0, n_bytes, 1 << 24):
            f.write(rng.integers(32, 127, size=min(1 << 24, n_bytes - lo), dtype=np.uint8).tobytes())


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train(run_dir: Path, steps: int, *overrides: str) -> tuple[int, float]:
    """Train tiny.toml on 1 process; return its peak RSS in bytes and the wall time."""
    args = [sys.executable, "-m", "meshtrain", "train", "--config", str(ROOT / "configs" / "tiny.toml")]
    args += ["--nproc", "1", "--run-dir", str(run_dir), "--set", f"training.steps={steps}"]
    for item in overrides:
        args += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(
        args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}
    )
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return max(r["peak_rss_bytes"] for r in records), time.perf_counter() - start


SAMPLER_PEAK = """
import re, sys
sys.path.insert(0, sys.argv[2])
from meshtrain.data.sampler import BatchSampler
def hwm():  # this process's own peak (VmHWM is per address space: not inherited, unlike ru_maxrss)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = hwm()
sampler = BatchSampler(int(sys.argv[1]), 8, 2, 0, 1, 1234)
for step in range(3):
    sampler.rank_indices(step)
print(hwm() - before)
"""


def sampler_peak(n_sequences: int) -> int:
    """Peak bytes the unchanged BatchSampler adds for a dataset of n_sequences (its permutation)."""
    out = subprocess.run([sys.executable, "-c", SAMPLER_PEAK, str(n_sequences), str(ROOT / "src")], capture_output=True)
    return int(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=540_000_000, help="tokens in the large corpus")
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--json", help="append the result rows to this file")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    small = args.tokens // 10
    rows = []
    try:
        for name, n in (("large", args.tokens), ("small", small)):
            seconds = write_corpus(tmp / name, n, seed=len(name))
            print(f"wrote {name}: {n:,} tokens, {2 * n / 1e9:.2f} GB in {seconds:.1f} s", flush=True)
        write_text(tmp / "text.txt", small, seed=0)
        print(f"this process's own peak RSS (a floor for its children's ru_maxrss): {peak_rss() / 2**20:.1f} MiB")
        runs = {
            f"tokens, memmap, {args.tokens:,} tokens": ("data.source=tokens", f"data.path={tmp / 'large'}"),
            f"tokens, memmap, {small:,} tokens": ("data.source=tokens", f"data.path={tmp / 'small'}"),
            f"files, in memory, {small:,} tokens": (
                "data.source=files",
                f"data.path={tmp / 'text.txt'}",
                f"data.max_tokens={small}",
            ),
        }
        for label, overrides in runs.items():
            rss, seconds = train(tmp / f"run{len(rows)}", args.steps, *overrides)
            rows.append(
                {"benchmark": "data", "run": label, "peak_rss_mib": round(rss / 2**20, 1), "wall_s": round(seconds, 1)}
            )
            print(f"{label:<40} peak RSS {rss / 2**20:8.1f} MiB   ({seconds:.1f} s for {args.steps} steps)", flush=True)
        for n in (args.tokens, small):  # what grows with the corpus in the memmap runs: the sampler's permutation
            seqs = (n - 1) // 32
            print(f"the sampler's permutation of {seqs:,} sequences alone: {sampler_peak(seqs) / 2**20:.1f} MiB peak")
    finally:
        shutil.rmtree(tmp)  # our own temporary folder, made above
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
