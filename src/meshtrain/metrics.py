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

from meshtrain.accounting import human_bytes

__all__ = ["GPU_PEAK_TFLOPS", "MetricsWriter", "ProgressBar", "detect_peak_tflops", "human_bytes", "peak_rss_bytes"]


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
    """Appends one JSON object per optimizer step to each of `paths` (rank 0: metrics.jsonl and its
    own metrics.rank0.jsonl; every other rank: its metrics.rank{R}.jsonl, which holds that rank's
    own memory and communication figures).

    On start it keeps the records up to `keep_through` (the step a run resumes from) and drops the
    rest, which the resumed run replays: a crash between checkpoints leaves no step twice. The
    files are rewritten through a temporary file and a rename, so a crash here tears nothing."""

    def __init__(self, paths: list[Path], keep_through: int) -> None:
        self.paths = paths
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = path.read_text().splitlines() if path.is_file() else []
            kept = [line for line in lines if (_step(line) or 0) <= keep_through and _step(line) is not None]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        for path in self.paths:
            with path.open("a") as f:
                f.write(line)


def _step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class ProgressBar:
    """Live bar on rank 0 when attached to a terminal; elsewhere the periodic log lines suffice."""

    def __init__(self, console: Console, total: int, start: int, enabled: bool) -> None:
        self.progress: Progress | None = None
        if enabled and console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "loss {task.fields[loss]}  {task.fields[tps]} tok/s  MFU {task.fields[mfu]}  mem {task.fields[mem]}"
                ),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self.task = self.progress.add_task(
                "train", total=total, completed=start, loss="-", tps="-", mfu="-", mem="-"
            )
            self.progress.start()

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(
                self.task,
                completed=step,
                loss=f"{rec['loss']:.4f}",
                tps=f"{rec['tokens_per_s']:,.0f}",
                mfu=f"{100 * rec['mfu']:.2f}%",
                mem=human_bytes(rec["peak_rss_bytes"]),
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
