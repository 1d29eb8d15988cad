"""`meshtrain lighthouse`: the meeting point of a DiLoCo run whose islands are separate launches.

It hosts the TCP key-value store (torch's TCPStore) at which the islands agree, sync by sync, who is
present (meshtrain.diloco.membership); it holds no training state, so it can run on any small
machine the islands reach. One lighthouse per run: the store remembers the run's last sync.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

_DESCRIPTION = """Host the outer rendezvous store of a DiLoCo run in join mode, until interrupted (Ctrl-C).

Each island is its own `meshtrain train` launch with parallel.diloco=K, diloco.join=HOST:PORT (this
lighthouse), diloco.island=i and diloco.timeout_s. At every outer sync the islands present agree
here on the members; an island that does not show up within timeout_s is dropped, and one that
(re)starts while the run is live joins at the next sync with a live island's outer state. The
lighthouse holds no model or optimizer state; start a fresh one for each run."""

_EXAMPLES = """example (two islands, one terminal each):
  meshtrain lighthouse --port 29600
  meshtrain train --config configs/tiny.toml --run-dir runs/island0 --max-restarts 3 \\
      --set parallel.diloco=2 --set diloco.join=127.0.0.1:29600 --set diloco.island=0
  meshtrain train --config configs/tiny.toml --run-dir runs/island1 --max-restarts 3 \\
      --set parallel.diloco=2 --set diloco.join=127.0.0.1:29600 --set diloco.island=1
"""


def add_parser(subparsers: Any) -> None:
    """Register the `lighthouse` subcommand (meshtrain.cli's LAZY table)."""
    p = subparsers.add_parser(
        "lighthouse",
        help="host the rendezvous store of DiLoCo islands launched separately (diloco.join)",
        description=_DESCRIPTION,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on (the islands' diloco.join)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface)")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from meshtrain.config import ConfigError

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a port number; give 1 .. 65535")
    import torch.distributed as dist  # torch only once the arguments are known to be good

    try:
        store = dist.TCPStore(args.host, args.port, is_master=True, wait_for_workers=False, use_libuv=True)
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {str(e).splitlines()[0]}") from e
    shown = "127.0.0.1" if args.host == "0.0.0.0" else args.host
    print(
        f"lighthouse listening on {args.host}:{store.port}: islands join with diloco.join={shown}:{store.port}",
        flush=True,
    )
    while True:  # the store serves from its own thread; this one only keeps the process alive
        time.sleep(3600)
