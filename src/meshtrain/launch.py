"""Start this node's worker processes through torch's elastic launcher (the machinery behind torchrun).

One node: a c10d rendezvous on a free local port. Several nodes: every node runs `meshtrain train`
with the same --nnodes, --master-addr and --master-port and its own --node-rank; node 0 hosts the
rendezvous store at that address (torch's static rendezvous, as torchrun --node-rank uses), and the
global ranks are node_rank * nproc + local rank.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Nodes:
    """This node's place in a multi-node run."""

    count: int
    rank: int
    master_addr: str
    master_port: int


def _config(nproc: int, max_restarts: int, nodes: Nodes | None) -> LaunchConfig:
    if nodes is None:
        count, run_id, backend = 1, f"meshtrain-{uuid.uuid4().hex[:8]}", "c10d"
        endpoint, rdzv_configs = f"127.0.0.1:{free_port()}", {}
    else:  # every node must name the same run; the endpoint is the one thing they all share
        count, run_id, backend = nodes.count, f"meshtrain-{nodes.master_port}", "static"
        endpoint, rdzv_configs = f"{nodes.master_addr}:{nodes.master_port}", {"rank": nodes.rank}
    return LaunchConfig(
        min_nodes=count,
        max_nodes=count,
        nproc_per_node=nproc,
        run_id=run_id,
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs=rdzv_configs,
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )


def launch(
    config_file: Path, nproc: int, max_restarts: int = 0, nodes: Nodes | None = None, compile_cache: Path | None = None
) -> int:
    """Run `python -m meshtrain.train --config config_file` on this node's nproc ranks; return an exit code.
    `compile_cache`: inductor's cache folder, shared by the ranks and kept for the next run to start warm
    (training.compile); a TORCHINDUCTOR_CACHE_DIR the user set wins."""
    if compile_cache is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache))
    # torchrun's own default: one BLAS thread per worker unless the user says otherwise.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    lc = _config(nproc, max_restarts, nodes)
    try:
        elastic_launch(lc, sys.executable)("-u", "-m", "meshtrain.train", "--config", str(config_file))
    except ChildFailedError as e:
        first = next(iter(e.failures.values()))
        print(
            f"error: rank {first.local_rank} exited with code {first.exitcode}; see the messages above", file=sys.stderr
        )
        return first.exitcode if first.exitcode > 0 else 1
    return 0
