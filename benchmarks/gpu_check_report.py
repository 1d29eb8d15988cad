"""Summarise one gpu_check.sh training run: tokens/s, MFU and peak memory vs the planner.

    python benchmarks/gpu_check_report.py --label eager --run-dir RUN --plan PLAN.json

RUN holds the run's metrics.jsonl; PLAN.json is `meshtrain plan --config ... --nproc 1 --json` for
the same config. The first steps (compilation, allocator growth, cuDNN/cuBLAS choices) are left out
of the medians. MFU uses the datasheet dense bf16 peak of the device that ran this script, not the
trainer's own MFU field, so the two can be compared (the trainer's is printed alongside).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

# Dense bf16 peak per GPU (TFLOP/s), from the vendors' datasheets, without sparsity.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
GIB = 2**30


def device_peak() -> tuple[str, float | None]:
    """(device name, its dense bf16 peak in FLOP/s, or None when not in the table or no GPU)."""
    import torch  # late: reading a report must not need a GPU build

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return name, tf * 1e12
    return name, None


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    """The run's step records, in order (records without tokens_per_s are skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "tokens_per_s" in r]


def after_warmup(steps: list[dict[str, Any]], warmup: int) -> list[dict[str, Any]]:
    """The records the medians use: all but the first `warmup`, or the last one of a shorter run."""
    return steps[warmup:] if len(steps) > warmup else steps[-1:]


def summarise(label: str, steps: list[dict[str, Any]], pred: dict[str, Any], warmup: int) -> list[str]:
    """The report lines for one run."""
    if not steps:
        return [f"[{label}] no step records: the run failed or timed out before its first step"]
    kept = after_warmup(steps, warmup)
    tps = [r["tokens_per_s"] for r in kept]
    med = statistics.median(tps)
    lines = [
        f"[{label}] tokens/s median {med:,.0f} over steps {kept[0]['step']}-{kept[-1]['step']} "
        f"(n={len(kept)}, min {min(tps):,.0f}, max {max(tps):,.0f}); step_time_s median "
        f"{statistics.median(r['step_time_s'] for r in kept):.3f}"
    ]
    name, peak = device_peak()
    fpt = pred["flops_per_token"]
    own = statistics.median(r["mfu"] for r in kept)
    if peak is None:
        lines.append(f"[{label}] MFU peak unknown ({name}); flops/token {fpt:.4g}; trainer's own MFU {own:.2%}")
    else:
        lines.append(
            f"[{label}] MFU {med * fpt / peak:.2%} of {peak / 1e12:.0f} TF/s ({name}); flops/token {fpt:.4g}; "
            f"trainer's own MFU {own:.2%}"
        )
    predicted = pred["mem_model_state_bytes"] + pred["mem_activation_bytes"]
    key = "peak_cuda_bytes" if "peak_cuda_bytes" in steps[-1] else "peak_rss_bytes"
    measured = max(r[key] for r in steps)
    lines.append(
        f"[{label}] peak memory {measured / GIB:.3f} GiB ({key}) vs predicted {predicted / GIB:.3f} GiB "
        f"(model state {pred['mem_model_state_bytes'] / GIB:.3f} + activations "
        f"{pred['mem_activation_bytes'] / GIB:.3f}); measured/predicted {measured / predicted:.2f}; "
        f"predicted_bytes={predicted}"
    )
    return lines


def median_tps(run_dir: Path, warmup: int) -> float | None:
    """Median tokens/s after warm-up, or None for a run without step records."""
    kept = after_warmup(read_steps(run_dir), warmup)
    return statistics.median(r["tokens_per_s"] for r in kept) if kept else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--plan", type=Path, help="the planner's --json output for the same config")
    ap.add_argument("--baseline", type=Path, help="instead: print RUN's median tokens/s over this run's")
    ap.add_argument("--warmup", type=int, default=3, help="leading steps left out of the medians")
    args = ap.parse_args()
    if args.baseline is not None:
        a, b = median_tps(args.run_dir, args.warmup), median_tps(args.baseline, args.warmup)
        ratio = f"{a / b:.3f}" if a and b else "n/a (a run has no step records)"
        print(f"[{args.label}] median tokens/s ratio (same script, same machine): {ratio}")
        return
    if args.plan is None:
        ap.error("--plan (or --baseline) is required")
    try:
        pred = json.loads(args.plan.read_text())["prediction"]
    except (OSError, ValueError, KeyError) as e:
        print(f"[{args.label}] no planner prediction in {args.plan} ({type(e).__name__}): nothing to compare")
        return
    print("\n".join(summarise(args.label, read_steps(args.run_dir), pred, args.warmup)))


if __name__ == "__main__":
    main()
