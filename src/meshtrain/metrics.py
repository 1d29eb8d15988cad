"""Throughput, MFU and memory figures, the metrics.jsonl writer, and rank 0's live progress bar."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


# Dense bf16 peak per GPU, from the vendors' datasheets (no sparsity).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def detect_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """GPU: the datasheet figure by name. CPU: a short matmul probe of this process's threads."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf
        return 100.0
    n = 512
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up the kernel choice
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.15:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsWriter:
    """Appends one JSON object per optimizer step; only rank 0 holds a file."""

    def __init__(self, path: Path | None, truncate: bool) -> None:
        self.path = path
        if path is not None and truncate:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressBar:
    """Live bar on rank 0 when attached to a terminal; elsewhere the periodic log lines suffice."""

    def __init__(self, console: Console, total: int, start: int, enabled: bool) -> None:
        self.progress: Progress | None = None
        if enabled and console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  MFU {task.fields[mfu]}  "
                           "mem {task.fields[mem]}"),
                TimeRemainingColumn(), console=console, transient=False)
            self.task = self.progress.add_task("train", total=total, completed=start,
                                               loss="-", tps="-", mfu="-", mem="-")
            self.progress.start()

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{rec['loss']:.4f}",
                                 tps=f"{rec['tokens_per_s']:,.0f}", mfu=f"{100 * rec['mfu']:.2f}%",
                                 mem=human_bytes(rec["peak_rss_bytes"]))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
