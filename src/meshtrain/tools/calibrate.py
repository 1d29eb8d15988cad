"""`meshtrain bench-comm --calibrate out.toml`: this machine measured into a cluster TOML for the planner.

Per op and group size, time(bytes) = alpha + bytes / beta is fitted to bench-comm's median times by
least squares on *relative* residuals (weights 1 / t^2), so that the microsecond-scale small
messages and the millisecond-scale large ones count alike; R^2 (in the same weighting) and the
largest relative residual say how well the line fits.

The matmul peak is the best FLOP/s square matmuls sustain over a fixed window in the working dtype on one rank
*while every rank runs them at once*: with more ranks than cores the ranks share cores, and that
is what the planner should assume, so it is measured rather than assumed away. The same sweep on
the calling process alone is recorded next to it, so the file says what oversubscription costs.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MATMUL_SIZES = (256, 512)
# bench-comm's ops as the planner's collective kinds; broadcast and the int8 gather have none
PLANNER_KIND = {
    "all_reduce": "all_reduce",
    "all_gather": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "all_to_all": "all_to_all",
    "send_recv": "p2p",
}


@dataclass(frozen=True)
class Fit:
    """time(bytes) = alpha + bytes / beta, in seconds and bytes per second."""

    alpha: float
    beta: float
    r2: float
    max_rel_residual: float

    def predict(self, nbytes: float) -> float:
        return self.alpha + nbytes / self.beta


def fit_alpha_beta(sizes: list[float], times: list[float]) -> Fit:
    """Weighted least squares of t = alpha + s * bytes with weights 1 / t^2 (module docstring);
    a negative alpha is refitted through the origin, a non-positive slope as a constant."""
    w = [1.0 / t**2 for t in times]
    a, b, c = sum(w), sum(wi * x for wi, x in zip(w, sizes)), sum(wi * x * x for wi, x in zip(w, sizes))
    d, e = sum(wi * t for wi, t in zip(w, times)), sum(wi * x * t for wi, x, t in zip(w, sizes, times))
    det = a * c - b * b
    alpha, slope = ((c * d - b * e) / det, (a * e - b * d) / det) if det > 0 else (0.0, e / c)
    if alpha < 0:
        alpha, slope = 0.0, e / c
    if slope <= 0:  # no measurable bandwidth term over these sizes: a constant, with a huge beta
        alpha, slope = d / a, 1e-18
    pred = [alpha + slope * x for x in sizes]
    mean = d / a
    spread = sum(wi * (t - mean) ** 2 for wi, t in zip(w, times))
    resid = sum(wi * (t - p) ** 2 for wi, t, p in zip(w, times, pred))
    r2 = 1.0 - resid / spread if spread > 0 else 1.0
    worst = max(abs(p - t) / t for t, p in zip(times, pred))
    return Fit(alpha, 1.0 / slope, r2, worst)


def fit_rows(rows: list[dict]) -> dict[tuple[str, int], Fit]:
    """One fit per (op, ranks) of bench-comm's rows, on the median times."""
    keys = dict.fromkeys((r["op"], r["ranks"]) for r in rows)
    out = {}
    for op, n in keys:
        mine = [r for r in rows if r["op"] == op and r["ranks"] == n]
        out[(op, n)] = fit_alpha_beta([float(r["bytes"]) for r in mine], [r["time_us"] * 1e-6 for r in mine])
    return out


def matmul_flops(
    dtype: Any, device: str, sizes: tuple[int, ...] = MATMUL_SIZES, seconds: float = 0.25, repeats: int = 3
) -> float:
    """Best, over the sizes, of the median over `repeats` windows of the FLOP/s that n x n matmuls
    sustain for `seconds` of wall time.

    A fixed window rather than a fixed count: every rank that started at the same barrier is still
    busy until the window closes, so the ranks really do share the cores the whole time. The median
    window, as a run's median step: on a machine other jobs share, the best window would catch a
    quiet moment that the runs it predicts do not see."""
    import torch

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize(device)

    best = 0.0
    for n in sizes:
        x, y = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        torch.mm(x, y)  # warm-up, not counted
        sync()
        rates = []
        for _ in range(repeats):
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                torch.mm(x, y)
                sync()
                calls += 1
            rates.append(2.0 * n**3 * calls / (time.perf_counter() - start))
        best = max(best, statistics.median(rates))
    return best


# the op-mix probe: a small Llama unlike any run's shapes, so the efficiency is measured, not fitted to a run
PROBE: dict[str, Any] = {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "max_seq_len": 64}
PROBE_BATCH = 8


def block_efficiency(seconds: float = 0.5) -> float:
    """FLOP/s of a whole model's forward and backward (matmuls, attention, norms, elementwise ops and
    per-op overhead together), counted as the planner counts them (planner/timing.py: forward
    tokens x (layers x block + head), backward twice that), over the bare matmul FLOP/s on this
    process alone, one thread: the fraction of the matmul peak our training compute reaches."""
    import torch

    from meshtrain.config import ModelConfig
    from meshtrain.model.llama import Llama
    from meshtrain.model.math import from_model_config, layer_forward_flops_per_token

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = ModelConfig(**PROBE)
        model, seq = Llama(cfg), cfg.max_seq_len
        x = torch.randint(0, cfg.vocab_size, (PROBE_BATCH, seq))
        shape = from_model_config(cfg, seq)
        flops = (
            3
            * PROBE_BATCH
            * seq
            * (shape.n_layers * layer_forward_flops_per_token(shape, seq) + 2 * shape.vocab * shape.hidden)
        )

        def step() -> None:
            model(x).float().mean().backward()

        step()  # warm-up, not counted
        rates = []
        for _ in range(3):  # the median window, as matmul_flops keeps
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 3:
                step()
                calls += 1
            rates.append(flops * calls / (time.perf_counter() - start))
        return min(1.0, statistics.median(rates) / matmul_flops(torch.float32, "cpu"))
    finally:
        torch.set_num_threads(threads)


def alone_flops(dtype_name: str, backend: str) -> float:
    """The matmul sweep on the calling process alone, with one thread as each bench rank has."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        return matmul_flops(dtype, "cuda:0" if backend == "nccl" else "cpu")
    finally:
        torch.set_num_threads(threads)


def memory_gib(backend: str, nproc: int) -> float:
    """Device memory for nccl; otherwise the host's physical memory shared by the ranks."""
    if backend == "nccl":
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory) / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / nproc


def _fit_line(op: str, n: int, f: Fit) -> str:
    return (
        f'  {{ op = "{PLANNER_KIND[op]}", ranks = {n}, alpha_us = {f.alpha * 1e6:.3f}, '
        f"beta_gbs = {f.beta / 1e9:.6g}, r2 = {f.r2:.4f}, max_rel_residual = {f.max_rel_residual:.4f} }},"
    )


def _ring_lines(fits: dict[tuple[str, int], Fit], n: int) -> list[str]:
    """Ops without a fit fall back to the ring model: its per-step latency and bus bandwidth from the
    fit of the all-reduce (else the first planner op) at the full group."""
    from meshtrain.planner.comm import ring_terms

    mine = sorted((op != "all_reduce", op) for op, m in fits if m == n and op in PLANNER_KIND)
    if not mine:
        return []
    op = mine[0][1]
    fit, (factor, steps) = fits[(op, n)], ring_terms(PLANNER_KIND[op], n)
    return [f"intra_latency_us = {fit.alpha * 1e6 / steps:.3f}", f"intra_bw_gbs = {fit.beta * factor / 1e9:.6g}"]


def cluster_toml(fits: dict[tuple[str, int], Fit], info: dict[str, Any]) -> str:
    """The [cluster] table `load_cluster` reads, under a comment header saying how it was measured."""
    n = info["nproc"]
    lines = [
        f"# meshtrain bench-comm --calibrate, {info['when']} on {info['host']}: {n} ranks, {info['backend']}, "
        f"{info['dtype']}, sizes {info['sizes']}, median of {info['iters']} calls",
        f"# cores seen: {info['cores']} (usable by this process: {info['affinity']})",
        f"# matmul FLOP/s per rank: {info['alone'] / 1e9:.2f} G alone, {info['busy'] / 1e9:.2f} G with all {n} "
        "ranks busy (the peak below; ranks > cores share them)",
        "# efficiency: a small Llama's forward + backward FLOP/s over the matmul's, alone (calibrate.block_efficiency)",
        "# collectives: time = alpha + bytes / beta, least squares on relative residuals (weights 1/t^2)",
        "# fields not written here come from the base preset",
        "[cluster]",
        f'base = "{"h100-80gb" if info["backend"] == "nccl" else "cpu"}"',
        f'name = "{info["name"]}"',
        f"peak_tflops = {info['busy'] / 1e12:.6g}",
        *([f"efficiency = {info['efficiency']:.4f}"] if info.get("efficiency") else []),
        *([f"cores = {info['affinity']}", f"calibrated_ranks = {n}"] if info["backend"] != "nccl" else []),
        f"memory_gib = {info['memory_gib']:.3f}",
        f"gpus_per_node = {n}",
        f'precision = "{info["dtype"]}"',
        *_ring_lines(fits, n),
        "collectives = [",
        *(_fit_line(op, m, f) for (op, m), f in sorted(fits.items()) if op in PLANNER_KIND),
        "]",
    ]
    return "\n".join(lines) + "\n"


def describe(args: Any, alone: float, busy: float) -> dict[str, Any]:
    """What the TOML header and table need besides the fits."""
    return {
        "nproc": args.nproc,
        "backend": args.backend,
        "dtype": args.dtype,
        "sizes": args.sizes,
        "iters": args.iters,
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node() or "unknown host",
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "alone": alone,
        "busy": busy,
        "name": f"calibrated-{args.nproc}x-{args.backend}-{args.dtype}",
        "memory_gib": memory_gib(args.backend, args.nproc),
        "efficiency": block_efficiency() if args.backend == "gloo" else 0.0,
    }


def report_lines(fits: dict[tuple[str, int], Fit]) -> list[str]:
    """The fit table bench-comm prints: alpha, beta, R^2 and the worst relative residual."""
    out = [f"{'op':>16} {'ranks':>5} {'alpha us':>10} {'beta GB/s':>10} {'R^2':>7} {'max rel res':>11}"]
    for (op, n), f in sorted(fits.items()):
        out.append(
            f"{op:>16} {n:>5} {f.alpha * 1e6:>10.1f} {f.beta / 1e9:>10.3f} {f.r2:>7.4f} {f.max_rel_residual:>11.3f}"
        )
    return out


def write(path: Path, rows: list[dict], info: dict[str, Any]) -> list[str]:
    """Fit the rows, write the cluster TOML, and return the lines to print."""
    fits = fit_rows(rows)
    path.write_text(cluster_toml(fits, info))
    lines = [f"# calibration: {path} (cluster {info['name']})", *report_lines(fits)]
    lines.append(
        f"# matmul {info['dtype']}: {info['alone'] / 1e9:.2f} GFLOP/s per rank alone, "
        f"{info['busy'] / 1e9:.2f} with {info['nproc']} ranks busy on {info['affinity']} cores"
    )
    return lines
