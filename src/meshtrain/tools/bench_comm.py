"""`meshtrain bench-comm`: collective bandwidth on this machine's backend, nccl-tests style.

For every op and size: the time of one call (min and median of --iters after warm-up, a barrier
before each), the algorithm bandwidth (bytes / time) and the bus bandwidth, which scales algbw by
what a ring moves per rank so that every op reads against the link's speed (nccl-tests' factors):
all-reduce 2(n-1)/n; all-gather, reduce-scatter and all-to-all (n-1)/n; broadcast and send/recv 1.
Sizes follow nccl-tests too: all-gather's is the gathered output, reduce-scatter's the full input,
all-to-all's what each rank holds. Every result is checked against the values it must hold.

The calls go straight to torch.distributed (the backend is what is measured), apart from
`all_gather_int8`: core.comm's compressed all-gather (int8 codes and a scale per 2,048 elements),
timed on the fp32 bytes it stands for, so its bandwidth reads against the plain all-gather's.

`--backend mpi` runs the same ops over mpi4py on mpich (tools/bench_comm_mpi.py, launched by
mpiexec); `--compare gloo,mpi` runs several backends and prints them side by side. Every backend's
rows are built by `make_row`, so their bandwidths follow the same factors.

`--calibrate out.toml` fits alpha and beta per op and group size, times matmuls on every rank at
once, and writes a cluster TOML for `meshtrain plan --cluster` (tools/calibrate.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv", "all_gather_int8")
UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}
DTYPES = ("fp32", "bf16")
BACKENDS = ("gloo", "nccl", "mpi")

_DESCRIPTION = """\
Time collectives over N local ranks for sizes in powers of two, and print time, algbw and busbw
(nccl-tests' convention) per op and size, each result checked. --json prints the rows as JSON;
--out draws busbw against size per op.
"""
_EXAMPLES = """\
examples:
  meshtrain bench-comm --nproc 4
  meshtrain bench-comm --nproc 2 --ops all_reduce,all_to_all --sizes 1K:16M --json
  meshtrain bench-comm --nproc 4 --out busbw.png
  meshtrain bench-comm --nproc 2 --compare gloo,mpi --out gloo_mpi.png   # after: pip install mpich mpi4py
  meshtrain bench-comm --nproc 4 --calibrate mine.toml && meshtrain plan --cluster mine.toml --config configs/default.toml
"""


def bus_factor(op: str, n: int) -> float:
    """busbw / algbw for `op` on n ranks (module docstring)."""
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("broadcast", "send_recv"):
        return 1.0
    return (n - 1) / n


def make_row(op: str, size: int, median: float, fastest: float, right: bool, n: int, backend: str) -> dict:
    """One --json row from the slowest rank's median and min seconds; every backend's rows come from here."""
    algbw = size / median / 1e9
    return {
        "op": op,
        "bytes": size,
        "time_us": median * 1e6,
        "min_us": fastest * 1e6,
        "algbw": algbw,
        "busbw": algbw * bus_factor(op, n),
        "ok": right,
        "ranks": n,
        "backend": backend,
    }


def parse_sizes(text: str) -> list[int]:
    """ "1K:256M" -> every power of two from 1 KiB to 256 MiB, in bytes; "4K" -> [4096]."""

    def one(part: str) -> int:
        part = part.strip().upper()
        scale = UNITS.get(part[-1:], 1)
        number = part[:-1] if part[-1:] in UNITS else part
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"--sizes {text!r}: {part!r} is not a size such as 512, 4K, 16M or 1G")
        return int(number) * scale

    lo, _, hi = text.partition(":")
    first, last = one(lo), one(hi or lo)
    if last < first:
        raise ValueError(f"--sizes {text!r}: the range runs backwards")
    sizes, size = [], first
    while size <= last:
        sizes.append(size)
        size *= 2
    return sizes


def _call(op: str, nbytes: int, n: int, rank: int, dtype: Any) -> tuple[Callable[[], None], Callable[[], bool]]:
    """(run the op once, check its result) for a message of `nbytes` in `dtype`."""
    import torch
    import torch.distributed as dist

    from meshtrain.accounting import CommStats
    from meshtrain.core.comm import all_gather_compressed

    size = torch.tensor([], dtype=dtype).element_size()
    count = max(n, nbytes // size // n * n)  # whole elements, divisible by n for the sharded ops
    mine = torch.full((count,), float(rank + 1), dtype=dtype)
    out = torch.empty(count, dtype=dtype)
    share = count // n
    total = float(n * (n + 1) // 2)
    if op == "all_reduce":
        return lambda: dist.all_reduce(mine.fill_(rank + 1)), lambda: bool((mine == total).all())
    if op == "all_gather":
        piece = mine[:share]
        expected = torch.arange(1, n + 1, dtype=dtype).repeat_interleave(share)
        return lambda: dist.all_gather_single(out[: n * share], piece), lambda: torch.equal(out[: n * share], expected)
    if op == "reduce_scatter":
        return lambda: dist.reduce_scatter_single(out[:share], mine), lambda: bool((out[:share] == total).all())
    if op == "all_to_all":
        expected = torch.arange(1, n + 1, dtype=dtype).repeat_interleave(share)
        return lambda: dist.all_to_all_single(out, mine), lambda: torch.equal(out, expected)
    if op == "broadcast":
        return lambda: dist.broadcast(mine.fill_(rank + 1), 0), lambda: bool((mine == 1).all())
    if op == "send_recv":  # rank r sends to r+1 and receives from r-1, around the ring

        def exchange() -> None:
            ops = [dist.P2POp(dist.isend, mine, (rank + 1) % n), dist.P2POp(dist.irecv, out, (rank - 1) % n)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

        return exchange, lambda: bool((out == float((rank - 1) % n + 1)).all())
    stats, piece = CommStats(), mine[:share].float()
    got: list[Any] = []

    def gather_int8() -> None:
        got[:] = [all_gather_compressed(piece, cast(dist.ProcessGroup, dist.group.WORLD), stats, bits=8, block=2048)]

    # constant blocks quantize exactly: every code is 127, every scale (r + 1) / 127
    expected = torch.arange(1, n + 1, dtype=torch.float32).repeat_interleave(share)
    return gather_int8, lambda: torch.allclose(got[0], expected, rtol=1e-6)


def _measure(op: str, nbytes: int, n: int, rank: int, dtype: Any, iters: int) -> tuple[float, float, bool]:
    """(median, min) seconds of one call on this rank, and whether the result was right."""
    import torch.distributed as dist

    run, check = _call(op, nbytes, n, rank, dtype)
    median, fastest = time_calls(run, dist.barrier, iters)
    return median, fastest, bool(check())


def time_calls(run: Callable[[], Any], barrier: Callable[[], Any], iters: int) -> tuple[float, float]:
    """(median, min) seconds of `run` over `iters` calls after 2 warm-up calls, a barrier before each
    so that every rank starts the call together; every backend is timed here."""
    for _ in range(2):
        run()
    times = []
    for _ in range(iters):
        barrier()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def _worker(rank: int, n: int, store: str, plan: dict[str, Any], out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(plan["backend"], store=dist.FileStore(store, n), rank=rank, world_size=n)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[plan["dtype"]]
    cases = [(op, size) for op in plan["ops"] for size in plan["sizes"]]
    got = torch.tensor([_measure(op, size, n, rank, dtype, plan["iters"]) for op, size in cases], dtype=torch.float64)
    # a collective takes as long as its slowest rank, and is right only if it is right everywhere
    times, ok = got[:, :2].contiguous(), got[:, 2].contiguous()
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if plan.get("matmul"):
        _matmul(rank, n, dtype, plan["backend"], out)
    if rank == 0:
        rows = [
            make_row(op, size, median, fastest, right == 1.0, n, plan["backend"])
            for (op, size), (median, fastest), right in zip(cases, times.tolist(), ok.tolist())
        ]
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()
    os._exit(0)  # gloo can abort in interpreter teardown; the work is written


def _matmul(rank: int, n: int, dtype: Any, backend: str, out: str) -> None:
    """Every rank times matmuls at the same moment (oversubscription measured); rank 0 writes the
    slowest rank's best FLOP/s, since a step waits for its slowest rank."""
    import torch
    import torch.distributed as dist

    from meshtrain.tools.calibrate import matmul_flops

    dist.barrier()
    mine = torch.tensor([matmul_flops(dtype, f"cuda:{rank}" if backend == "nccl" else "cpu")], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MIN)
    if rank == 0:
        Path(out + ".matmul").write_text(json.dumps(mine.item()))


def run_bench(
    nproc: int, ops: list[str], sizes: list[int], dtype: str, backend: str, iters: int, matmul: bool = False
) -> tuple[list[dict], float]:
    """The rows, and with `matmul` the per-rank matmul FLOP/s with all ranks busy (else 0)."""
    import torch.multiprocessing as mp

    plan = {"ops": ops, "sizes": sizes, "dtype": dtype, "backend": backend, "iters": iters, "matmul": matmul}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(nproc, os.path.join(tmp, "store"), plan, out), nprocs=nproc, join=True)
        flops = float(json.loads(Path(out + ".matmul").read_text())) if matmul else 0.0
        return list(json.loads(Path(out).read_text())), flops


def add_parser(subparsers: Any) -> None:
    """Register the `bench-comm` subcommand (meshtrain.cli's LAZY table)."""
    p = subparsers.add_parser(
        "bench-comm",
        help="time collectives over local ranks: time, algbw and busbw per op and size",
        description=_DESCRIPTION,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nproc", type=int, default=2, help="local ranks (default 2)")
    p.add_argument(
        "--ops", default=",".join(OPS[:6]), help=f"comma-separated, of: {', '.join(OPS)} (default: all but int8)"
    )
    p.add_argument(
        "--sizes", default="1K:16M", help="bytes per message, a power-of-two range such as 1K:256M (default 1K:16M)"
    )
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="element type (default fp32)")
    p.add_argument(
        "--backend",
        default="gloo",
        choices=BACKENDS,
        help="gloo or nccl (torch.distributed), or mpi (mpi4py on mpich, launched by mpiexec) (default gloo)",
    )
    p.add_argument(
        "--compare",
        metavar="B1,B2",
        help="run each of these backends (e.g. gloo,mpi) and print one table: time and busbw per backend, "
        "and the last's busbw over the first's; --out draws every backend's busbw",
    )
    p.add_argument(
        "--iters", type=int, default=10, help="timed calls per op and size, after 2 warm-up calls (default 10)"
    )
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of a table")
    p.add_argument("--out", help="draw busbw against size, one line per op, into this PNG")
    p.add_argument(
        "--calibrate",
        metavar="PATH",
        help="fit alpha + bytes/beta per op and group size (also at 2 ranks when --nproc > 2), time matmuls "
        "on all ranks at once, and write a cluster TOML for `meshtrain plan --cluster PATH`",
    )
    p.set_defaults(func=run_cli)


def _backends(args: argparse.Namespace, ops: list[str]) -> list[str]:
    """--compare's backends (or --backend alone), each checked to run here with these options."""
    from meshtrain.config import ConfigError

    names = [b.strip() for b in args.compare.split(",") if b.strip()] if args.compare else [args.backend]
    if args.compare and (len(set(names)) != len(names) or len(names) < 2 or not set(names) <= set(BACKENDS)):
        raise ConfigError(f"--compare {args.compare!r}: needs two or more different backends of {', '.join(BACKENDS)}")
    if args.compare and args.calibrate:
        raise ConfigError(f"--compare {args.compare!r} with --calibrate: calibrate one backend at a time (--backend)")
    if "mpi" in names:
        from meshtrain.tools.bench_comm_mpi import missing

        if why := missing():
            raise ConfigError(why)
        torch_only = [op for op in ops if op == "all_gather_int8"]
        if args.dtype != "fp32" or torch_only or args.calibrate:
            raise ConfigError(
                f"--backend mpi with --dtype {args.dtype}, --ops {','.join(torch_only) or '-'}, --calibrate "
                f"{args.calibrate or '-'}: MPI runs fp32 (no bf16 reduction) and the plain ops only, uncalibrated; "
                "drop those, or use --backend gloo"
            )
    return names


def _checked(args: argparse.Namespace) -> tuple[list[str], list[int], list[str]]:
    from meshtrain.config import ConfigError

    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise ConfigError(f"--ops {args.ops!r}: unknown {unknown or 'none given'}; choose from {', '.join(OPS)}")
    if args.nproc < 2 or args.iters < 1:
        raise ConfigError(f"--nproc {args.nproc} must be at least 2 and --iters {args.iters} at least 1")
    backends = _backends(args, ops)
    if "nccl" in backends:
        import torch

        if torch.cuda.device_count() < args.nproc:
            raise ConfigError(f"--backend nccl needs {args.nproc} GPUs, this machine has {torch.cuda.device_count()}")
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.calibrate:
        target = Path(args.calibrate)
        if target.suffix != ".toml" or len(sizes) < 2 or not target.parent.is_dir():
            raise ConfigError(
                f"--calibrate {args.calibrate!r} with --sizes {args.sizes!r}: needs a .toml path in an existing "
                f"folder and at least two sizes to fit a line (got {len(sizes)}); e.g. --sizes 1K:1M"
            )
    return ops, sizes, backends


def _rows(args: argparse.Namespace, backend: str, ops: list[str], sizes: list[int]) -> tuple[list[dict], float]:
    """One backend's rows at --nproc (and the busy matmul FLOP/s with --calibrate, else 0)."""
    if backend == "mpi":
        from meshtrain.tools import bench_comm_mpi

        return bench_comm_mpi.run_bench(args.nproc, ops, sizes, args.iters), 0.0
    return run_bench(args.nproc, ops, sizes, args.dtype, backend, args.iters, bool(args.calibrate))


def _compare(args: argparse.Namespace, ops: list[str], sizes: list[int], backends: list[str]) -> int:
    """--compare: every backend's rows, then one table with a time and busbw column per backend."""
    # the backends run in a shuffled order, so neither always meets the machine warmer or busier
    order = random.sample(backends, len(backends))
    print(f"# run order: {', '.join(order)}", file=sys.stderr)
    measured = {b: _rows(args, b, ops, sizes)[0] for b in order}
    rows = [r for b in backends for r in measured[b]]
    by = {(r["backend"], r["op"], r["bytes"]): r for r in rows}
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        first, last = backends[0], backends[-1]
        print(f"# {args.nproc} ranks, {args.dtype}; time: median of {args.iters} calls, us; busbw GB/s")
        head = "".join(f" {b + ' us':>11} {b + ' busbw':>11}" for b in backends)
        print(f"{'op':>16} {'bytes':>12}{head} {last + '/' + first:>11}  ok")
        for op in ops:
            for size in sizes:
                mine = [by[b, op, size] for b in backends]
                cells = "".join(f" {r['time_us']:>11.1f} {r['busbw']:>11.3f}" for r in mine)
                ratio = mine[-1]["busbw"] / mine[0]["busbw"]
                ok = "yes" if all(r["ok"] for r in mine) else "NO"
                print(f"{op:>16} {size:>12,}{cells} {ratio:>10.2f}x  {ok}")
    if args.out:
        _plot(rows, Path(args.out), args.nproc, ",".join(backends))
        print(f"# busbw plot: {args.out}", file=sys.stderr)
    return 0 if all(r["ok"] for r in rows) else 1


def run_cli(args: argparse.Namespace) -> int:
    ops, sizes, backends = _checked(args)
    if len(backends) > 1:
        return _compare(args, ops, sizes, backends)
    rows, busy = _rows(args, args.backend, ops, sizes)
    if args.calibrate and args.nproc > 2:  # a second group size, so the fits are not all at one n
        rows = run_bench(2, ops, sizes, args.dtype, args.backend, args.iters)[0] + rows
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"# {args.nproc} ranks, {args.backend}, {args.dtype}; time: median of {args.iters} calls (min)")
        print(
            f"{'op':>16} {'ranks':>5} {'bytes':>12} {'time us':>11} {'min us':>11} {'algbw GB/s':>11} {'busbw GB/s':>11}  ok"
        )
        for r in rows:
            print(
                f"{r['op']:>16} {r['ranks']:>5} {r['bytes']:>12,} {r['time_us']:>11.1f} {r['min_us']:>11.1f} "
                f"{r['algbw']:>11.3f} {r['busbw']:>11.3f}  {'yes' if r['ok'] else 'NO'}"
            )
    if args.out:
        _plot([r for r in rows if r["ranks"] == args.nproc], Path(args.out), args.nproc, args.backend)
        print(f"# busbw plot: {args.out}", file=sys.stderr)
    if args.calibrate:
        from meshtrain.tools import calibrate

        info = calibrate.describe(args, calibrate.alone_flops(args.dtype, args.backend), busy)
        lines = calibrate.write(Path(args.calibrate), rows, info)
        print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    return 0 if all(r["ok"] for r in rows) else 1


def _plot(rows: list[dict], path: Path, n: int, backend: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    for colour, op in enumerate(dict.fromkeys(r["op"] for r in rows)):
        for style, name in zip(("-", "--", ":"), backends):  # one colour per op, one dash per backend
            mine = [r for r in rows if r["op"] == op and r["backend"] == name]
            label = op if len(backends) == 1 else f"{op} ({name})"
            xs, ys = [r["bytes"] for r in mine], [r["busbw"] for r in mine]
            ax.plot(xs, ys, marker="o", linestyle=style, color=f"C{colour}", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"meshtrain bench-comm: {n} ranks, {backend}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
