"""Start N local worker processes through torch's elastic launcher (the machinery behind torchrun)."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config_file: Path, nproc: int, max_restarts: int = 0) -> int:
    """Run `python -m meshtrain.train --config config_file` on nproc ranks; return an exit code."""
    # torchrun's own default: one BLAS thread per worker unless the user says otherwise.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    lc = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"meshtrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(lc, sys.executable)("-u", "-m", "meshtrain.train", "--config", str(config_file))
    except ChildFailedError as e:
        first = next(iter(e.failures.values()))
        print(
            f"error: rank {first.local_rank} exited with code {first.exitcode}; see the messages above", file=sys.stderr
        )
        return first.exitcode if first.exitcode > 0 else 1
    return 0
