"""More ranks than cores: what sharing the cores does to a step's compute and communication.

`bench-comm --calibrate` measures the matmul peak per rank *with its N ranks all busy at once*
(peak_tflops) and records N (calibrated_ranks) and the cores the ranks shared (cores). A run on
W ranks of the same machine then gets cores / W of a core per rank while all of them compute, not
cores / N: its compute and its collectives (gloo's threads run on the same cores, so a
collective's measured time stretches with the ranks competing for them) are scaled by
share(W) / share(N), share(n) = max(1, n / cores). A cluster without these fields (every preset,
a GPU cluster) is left alone: one device per rank shares nothing.
"""

from __future__ import annotations

import dataclasses

from meshtrain.planner.layout import Layout
from meshtrain.planner.presets import ClusterSpec, CommFit


def _share(ranks: int, cores: int) -> float:
    """How many ranks take turns on each core while all of them run."""
    return max(1.0, ranks / cores)


def slowdown(cluster: ClusterSpec, world: int) -> float:
    """Seconds on `world` ranks per second the calibration measured (on calibrated_ranks ranks)."""
    if cluster.cores <= 0 or cluster.calibrated_ranks <= 0:
        return 1.0
    return _share(world, cluster.cores) / _share(cluster.calibrated_ranks, cluster.cores)


def _stretched(fit: CommFit, world: int, cores: int) -> CommFit:
    """A fit measured with only its own `ranks` processes alive, on a machine running `world` ranks."""
    k = _share(world, cores) / _share(fit.ranks, cores)
    return dataclasses.replace(fit, alpha_us=fit.alpha_us * k, beta_gbs=fit.beta_gbs / k)


def shared(cluster: ClusterSpec, world: int) -> ClusterSpec:
    """The cluster as one rank of a `world`-rank run sees it: the compute peak divided by the
    slowdown, and each collective fit stretched from the processes it was measured with to `world`."""
    if cluster.cores <= 0 or cluster.calibrated_ranks <= 0:
        return cluster
    fits = tuple(_stretched(f, world, cluster.cores) for f in cluster.collectives)
    return dataclasses.replace(cluster, peak_tflops=cluster.peak_tflops / slowdown(cluster, world), collectives=fits)


DP_PHASES = ("bwd_last", "fwd_first", "bwd_each", "fwd_each")


def on_shared_cores(
    times: dict[str, float], lay: Layout, cluster: ClusterSpec, world: int, dp_comm: float = 0.0
) -> dict[str, float]:
    """The step's breakdown (planner/timing.py) corrected for a CPU whose ranks share its cores.

    Tensor parallelism: timing.py divides a microbatch's compute by tp, but only its matmul share
    (`efficiency`, as calibrate.block_efficiency measured it) shrinks so; the rest, norms and per-op
    overhead, runs on every tp rank in full. Pipeline bubble: with more ranks than cores, a stage
    that waits gives its core to another rank, so the step is the larger of the machine's work over
    its cores (the compute, already scaled by `slowdown`) and the critical path each rank would
    take on a core of its own ((compute + bubble) / share). Overlap: timing.py hides DP and ZeRO
    collectives behind the backward; here gloo's threads need the very cores the backward runs on,
    so the whole `dp_comm` (seconds per step of those collectives) is exposed."""
    if cluster.cores <= 0 or cluster.calibrated_ranks <= 0:
        return times
    out = dict(times)
    eff = cluster.efficiency
    if lay.tp > 1:
        out["compute"] = times["compute"] * (eff + (1 - eff) * lay.tp)
    if dp_comm:
        out["dp/zero comm (exposed)"] = dp_comm
    share = _share(world, cluster.cores)
    if share > 1 and out.get("pipeline bubble", 0.0) > 0:
        busy = out["compute"] + out["recompute"]
        out["pipeline bubble"] = max(0.0, (busy + out["pipeline bubble"]) / share - busy)
    return out
