"""`meshtrain bench-comm --backend mpi`: the same collectives over MPI (mpi4py on mpich).

The CLI starts `mpiexec -n N python -m meshtrain.tools.bench_comm_mpi PLAN OUT`; every rank times
mpi4py's buffer calls on numpy arrays (Allreduce, Allgather, Reduce_scatter_block, Alltoall, Bcast,
Sendrecv) with bench_comm's `time_calls` (warm-up, a barrier before each call, min and median), checks each result against the values
it must hold, and rank 0 writes the rows through bench_comm's `make_row` (the same busbw factors).
torch is never imported here: MPI is what is measured, and the ranks start faster without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

INSTALL = "pip install mpich mpi4py (or pip install 'meshtrain[mpi]')"


def mpiexec() -> str | None:
    """mpich's launcher: the one beside this interpreter (where the mpich wheel puts it), else PATH's."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.is_file() else shutil.which("mpiexec")


def missing() -> str | None:
    """Why --backend mpi cannot run here, in one line naming the fix; None when it can.
    Imports the mpi4py package only: importing mpi4py.MPI would initialise MPI in the CLI's own process."""
    try:
        import mpi4py  # noqa: F401

        found = True
    except ImportError:
        found = False
    lacks = [name for name, ok in (("mpi4py", found), ("mpiexec", mpiexec() is not None)) if not ok]
    if not lacks:
        return None
    return f"--backend mpi needs mpi4py and mpich's mpiexec; missing: {', '.join(lacks)}; install: {INSTALL}"


def run_bench(nproc: int, ops: list[str], sizes: list[int], iters: int) -> list[dict]:
    """The rows of `nproc` MPI ranks, launched by mpiexec (fp32 only: MPI has no bf16 reduction)."""
    import meshtrain

    plan = {"ops": ops, "sizes": sizes, "iters": iters}
    src = str(Path(meshtrain.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    with tempfile.TemporaryDirectory() as tmp:
        plan_path, out = Path(tmp, "plan.json"), Path(tmp, "rows.json")
        plan_path.write_text(json.dumps(plan))
        cmd = [str(mpiexec()), "-n", str(nproc), sys.executable, "-m", __name__, str(plan_path), str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"mpiexec exited {proc.returncode}: {proc.stderr[-2000:]}")
        return list(json.loads(out.read_text()))


def _call(comm: Any, op: str, nbytes: int) -> tuple[Callable[[], None], Callable[[], bool]]:
    """(run the op once, check its result) for a message of `nbytes` fp32 bytes, as bench_comm._call."""
    import numpy as np
    from mpi4py import MPI

    n, rank = comm.Get_size(), comm.Get_rank()
    count = max(n, nbytes // 4 // n * n)
    mine = np.full(count, rank + 1, dtype=np.float32)
    out = np.empty(count, dtype=np.float32)
    share, total = count // n, float(n * (n + 1) // 2)
    stacked = np.repeat(np.arange(1, n + 1, dtype=np.float32), share)  # block j holds rank j's value

    def reduce_all() -> None:
        mine.fill(rank + 1)
        comm.Allreduce(MPI.IN_PLACE, mine)

    def bcast() -> None:
        mine.fill(rank + 1)
        comm.Bcast(mine, root=0)

    calls: dict[str, tuple[Callable[[], None], Callable[[], bool]]] = {
        "all_reduce": (reduce_all, lambda: bool((mine == total).all())),
        "all_gather": (
            lambda: comm.Allgather(mine[:share], out[: n * share]),
            lambda: bool(np.array_equal(out[: n * share], stacked)),
        ),
        "reduce_scatter": (
            lambda: comm.Reduce_scatter_block(mine, out[:share]),
            lambda: bool((out[:share] == total).all()),
        ),
        "all_to_all": (lambda: comm.Alltoall(mine, out), lambda: bool(np.array_equal(out, stacked))),
        "broadcast": (bcast, lambda: bool((mine == 1).all())),
        "send_recv": (  # rank r sends to r+1 and receives from r-1, around the ring
            lambda: comm.Sendrecv(mine, dest=(rank + 1) % n, recvbuf=out, source=(rank - 1) % n),
            lambda: bool((out == float((rank - 1) % n + 1)).all()),
        ),
    }
    return calls[op]


def _measure(comm: Any, op: str, nbytes: int, iters: int) -> tuple[float, float, float]:
    """(median, min) seconds of one call on this rank, and 1.0 if the result was right (else 0.0)."""
    from meshtrain.tools.bench_comm import time_calls

    run, check = _call(comm, op, nbytes)
    median, fastest = time_calls(run, comm.Barrier, iters)
    return median, fastest, float(check())


def main(plan_path: str, out: str) -> None:
    """One MPI rank: time every case, then rank 0 writes the rows (slowest rank's times, all ranks right)."""
    import numpy as np
    from mpi4py import MPI

    from meshtrain.tools.bench_comm import make_row

    comm = MPI.COMM_WORLD
    plan = json.loads(Path(plan_path).read_text())
    cases = [(op, size) for op in plan["ops"] for size in plan["sizes"]]
    got = np.array([_measure(comm, op, size, plan["iters"]) for op, size in cases], dtype=np.float64).reshape(-1, 3)
    # a collective takes as long as its slowest rank, and is right only if it is right everywhere
    times, ok = np.ascontiguousarray(got[:, :2]), np.ascontiguousarray(got[:, 2])
    comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    comm.Allreduce(MPI.IN_PLACE, ok, op=MPI.MIN)
    if comm.Get_rank() == 0:
        n = comm.Get_size()
        rows = [
            make_row(op, size, float(t[0]), float(t[1]), bool(r == 1.0), n, "mpi")
            for (op, size), t, r in zip(cases, times, ok)
        ]
        Path(out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
