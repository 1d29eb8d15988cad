"""Throughput, MFU and memory figures, the metrics.jsonl writer, its TensorBoard twin, and rank 0's
live progress bar."""

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

__all__ = [
    "GPU_PEAK_TFLOPS",
    "MetricsWriter",
    "ProgressBar",
    "TensorBoardWriter",
    "detect_peak_tflops",
    "human_bytes",
    "peak_rss_bytes",
    "tensorboard_scalars",
]


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


# TensorBoard tags (and so its sections) by record-key prefix, first match wins: (prefix, section,
# whether the prefix leaves the name). Everything else is "train/" (train/loss, train/lr).
TAG_GROUPS = (
    ("val_comm_", "val_comm/", True),
    ("val_", "val/", True),
    ("comm_", "comm/", True),
    ("mem_", "memory/", True),
    ("peak_", "memory/", False),
    ("zero3_", "memory/", False),
    ("moe_", "moe/", True),
    ("pp_", "pipeline/", True),
    ("step_time", "perf/", False),
    ("slowest_rank", "perf/", False),
    ("tokens_per_s", "perf/", False),
    ("mfu", "perf/", False),
)


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """Every number of a metrics record under a TensorBoard tag: comm_p2p_bytes -> comm/p2p_bytes,
    val_loss -> val/loss, peak_rss_bytes -> memory/peak_rss_bytes, loss -> train/loss. Flags
    (skipped), per-expert lists and the step itself are left out."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        section, name = "train/", key
        for prefix, group, drop in TAG_GROUPS:
            if key.startswith(prefix):
                section, name = group, key.removeprefix(prefix) if drop else key
                break
        out[section + name] = float(value)
    return out


class TensorBoardWriter:
    """Rank 0's metrics as TensorBoard scalars in RUN_DIR/tb, one event per number per step.

    A resumed run purges the events after the step it resumes from, as MetricsWriter drops those
    records, so that replayed steps appear once."""

    def __init__(self, log_dir: Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        for tag, value in tensorboard_scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()  # a crashed run keeps what it logged, as metrics.jsonl does

    def close(self) -> None:
        self.writer.close()


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
