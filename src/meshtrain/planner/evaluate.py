"""Predict one layout: memory of its fullest rank, step time of its slowest, MFU and HFU."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshtrain.model.math import ModelShape, iteration_flops, utilization
from meshtrain.planner.errors import PlanError
from meshtrain.planner.layout import Layout, RankParams, rank_params
from meshtrain.planner.memory import FP32, MIXED, MemoryInputs, StateDtypes, device_total, rank_memory
from meshtrain.planner.presets import ClusterSpec
from meshtrain.planner.timing import StepInputs, microbatch_compute, step_breakdown
from meshtrain.planner.traffic import TrafficInputs, step_collectives


@dataclass(frozen=True)
class Workload:
    """What to train and where: the fixed inputs every candidate layout shares."""

    shape: ModelShape
    cluster: ClusterSpec
    n_gpus: int
    global_batch: int
    seq_len: int
    attention: str = "flash"
    """flash (scores never stored) or naive (Korthikanti's 5as^2b term)."""
    bucket_mb: float = 25.0
    state_dtypes: StateDtypes | None = None
    """Overrides the cluster's precision for model states (our bf16 runs keep fp32 weights)."""
    activation_bytes: int | None = None

    @property
    def dtypes(self) -> StateDtypes:
        if self.state_dtypes is not None:
            return self.state_dtypes
        return MIXED if self.cluster.precision == "bf16" else FP32

    @property
    def act_bytes(self) -> int:
        if self.activation_bytes is not None:
            return self.activation_bytes
        return 2 if self.cluster.precision == "bf16" else 4

    @property
    def flops_per_s(self) -> float:
        return self.cluster.peak_flops * self.cluster.efficiency


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: dict[str, float]
    memory_total: float
    fits: bool
    time: dict[str, float] = field(default_factory=dict)
    step_time: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    hfu: float = 0.0
    model_flops: float = 0.0


def microbatches(ws: Workload, lay: Layout) -> int:
    per_dp = lay.dp * lay.micro_batch
    if ws.global_batch % per_dp:
        raise PlanError(f"global batch {ws.global_batch} is not divisible by dp*micro_batch = {per_dp}")
    return ws.global_batch // per_dp


def _stage_params(ws: Workload, lay: Layout) -> list[tuple[int, RankParams]]:
    """(pipeline rank, params) for the first and the last stage, one entry when pp == 1."""
    if lay.pp == 1:
        return [(0, rank_params(ws.shape, lay, first=True, last=True))]
    return [
        (0, rank_params(ws.shape, lay, first=True, last=False)),
        (lay.pp - 1, rank_params(ws.shape, lay, first=False, last=True)),
    ]


def plan_memory(ws: Workload, lay: Layout) -> tuple[dict[str, float], RankParams]:
    """Breakdown of the rank with the most device memory, and that rank's parameters."""
    mi = MemoryInputs(ws.seq_len, microbatches(ws, lay), ws.dtypes, ws.act_bytes, ws.attention, ws.bucket_mb)
    candidates = [(rank_memory(ws.shape, lay, mi, rp, stage), rp) for stage, rp in _stage_params(ws, lay)]
    return max(candidates, key=lambda c: device_total(c[0]))


def traffic_inputs(ws: Workload, lay: Layout) -> TrafficInputs:
    return TrafficInputs(ws.seq_len, microbatches(ws, lay), ws.dtypes, ws.act_bytes, ws.dtypes.grad, ws.bucket_mb)


def evaluate(ws: Workload, lay: Layout, memory_only: bool = False) -> Plan:
    """Memory always; time, throughput and utilization unless `memory_only` (used to prune)."""
    mem, _ = plan_memory(ws, lay)
    total = device_total(mem)
    fits = total <= ws.cluster.usable_bytes
    if memory_only:
        return Plan(lay, mem, total, fits)
    m = microbatches(ws, lay)
    # DP traffic follows the stage holding the most parameters; compute follows the last stage
    biggest = max((rp_ for _, rp_ in _stage_params(ws, lay)), key=lambda r: r.total)
    colls = step_collectives(ws.shape, lay, traffic_inputs(ws, lay), biggest)
    mc = microbatch_compute(ws.shape, lay, ws.seq_len, ws.attention, ws.flops_per_s)
    state = mem["params"] + mem["grads"] + mem["optimizer"]
    sharded = biggest.total / (lay.zero_group if lay.zero else 1)
    si = StepInputs(m, state, mem["host (offload)"], sharded, ws.dtypes.param)
    times = step_breakdown(mc, colls, lay, ws.cluster, si)
    step = sum(times.values())
    tokens = ws.global_batch * ws.seq_len
    # with flash attention the scores are never stored, so selective recompute redoes nothing
    redo = "none" if lay.recompute == "selective" and ws.attention == "flash" else lay.recompute
    model, hardware = iteration_flops(ws.shape, tokens, ws.seq_len, redo)
    peak = ws.cluster.peak_flops
    return Plan(
        lay,
        mem,
        total,
        fits,
        times,
        step,
        tokens / step,
        utilization(model, step, ws.n_gpus, peak),
        utilization(hardware, step, ws.n_gpus, peak),
        model,
    )
