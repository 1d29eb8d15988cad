"""Real-run pipeline traces, read back into the simulator's terms.

Each pipeline rank of the first data-parallel replica writes RUN_DIR/pp_trace/rank{r}.json with its
compute actions' (kind, stage, microbatch, start, end) from the final optimizer step (the executor's
close(), meshtrain.pipeline.executor). Times come from the machine-wide monotonic clock, so ranks on
one host line up. `from_trace` turns them into
the same SimResult a simulation produces: the same plot and bubble figure, for a real run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from meshtrain.pipeline.schedules import TWO_BW, Kind, TraceRecord, build_schedule, two_bw_window
from meshtrain.tools.simulator import Costs, SimResult, from_trace, simulate, simulate_steps


def load_trace(run_dir: Path) -> tuple[dict[str, Any], list[list[TraceRecord]]]:
    files = sorted((run_dir / "pp_trace").glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    if not files:
        raise FileNotFoundError(f"no pipeline trace under {run_dir / 'pp_trace'}; train with parallel.pp > 1 first")
    docs = [json.loads(f.read_text()) for f in files]
    meta = {k: v for k, v in docs[0].items() if k != "records"}
    return meta, [[tuple(r) for r in d["records"]] for d in docs]


def measured_costs(records: list[list[TraceRecord]], chunks: int) -> Costs:
    """Median duration per kind, scaled to a full rank-stage (the simulator's cost unit); `chunks` is
    the share of one action of that unit (virtual stages per rank, times token slices per sequence)."""
    by_kind: dict[str, list[float]] = {}
    for rows in records:
        for kind, _, _, start, end in rows:
            by_kind.setdefault(kind, []).append((end - start) * chunks)
    med = {k: statistics.median(v) for k, v in by_kind.items()}
    f = med.get("F", 0.0)
    if "W" in med:
        return Costs(f=f, b=med.get("B", 0.0), w=med["W"])
    return Costs(f=f, b=med.get("BW", 0.0), w=0.0)  # a fused backward: all of it counts as B


def compare(run_dir: Path) -> tuple[SimResult, SimResult, dict[str, Any]]:
    """(measured, predicted-from-measured-costs, meta) for a run's trace."""
    meta, records = load_trace(run_dir)
    slices = meta.get("slices", 1)  # a token-sliced run's records name units (slices of microbatches)
    measured = from_trace(records, chunks=meta["chunks"], slices=slices)
    costs = measured_costs(records, meta["chunks"] * slices)
    if meta["schedule"] == TWO_BW:  # the trace is the last step's window (also the first in a one-step run)
        window = two_bw_window(meta["pp"], meta["microbatches"], meta.get("steps") == 1, True)
        return measured, simulate_steps([window], meta["microbatches"], costs), meta  # ids as traced
    schedule, layout = build_schedule(meta["schedule"], meta["pp"], meta["microbatches"], meta["chunks"], slices)
    if all(a.kind != Kind.W for rank in schedule for a in rank):
        costs = Costs(f=costs.f, b=costs.b + costs.w, w=0.0)
    return measured, simulate(schedule, costs, layout), meta
