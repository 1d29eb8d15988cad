"""Rank-aware logging, in one place: rank 0 speaks at INFO, other ranks only warn; every line says who."""

from __future__ import annotations

import logging
import sys

from rich.console import Console


def get_logger(rank: int, world_size: int, console: Console | None = None) -> logging.Logger:
    logger = logging.getLogger(f"meshtrain.rank{rank}")
    if logger.handlers:
        return logger
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    tag = f"rank {rank}/{world_size}" if world_size > 1 else "main"
    if console is not None:
        handler: logging.Handler = _ConsoleHandler(console)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [{tag}] %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    return logger


class _ConsoleHandler(logging.Handler):
    """Prints through rich's console so log lines appear above a live progress bar, not through it."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
