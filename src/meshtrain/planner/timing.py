"""Step time: compute at a settable fraction of peak, collectives from the alpha-beta model
with per-strategy overlap, and the pipeline bubble from the simulator or the schedule's closed form."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from meshtrain.model.math import (
    ModelShape,
    active_layer_matmul_params,
    attention_core_flops_per_token,
    layer_forward_flops_per_token,
)
from meshtrain.pipeline.schedules import SCHEDULES
from meshtrain.planner.comm import collective_time
from meshtrain.planner.layout import Layout, groups, layers_per_rank
from meshtrain.planner.pipeline_sim import simulated_bubble
from meshtrain.planner.presets import ClusterSpec
from meshtrain.planner.traffic import Collective
from meshtrain.tools.simulator import Costs, closed_form


@dataclass(frozen=True)
class MicroCompute:
    """Seconds of compute for one microbatch on the slowest (last) pipeline rank."""

    fwd: float
    bwd: float
    """Backward including any recomputed forward."""
    wgrad: float
    """The weight-gradient half of the backward, which zero-bubble schedules defer."""
    attention_fwd: float
    recompute: float


def microbatch_compute(
    shape: ModelShape, lay: Layout, seq_len: int, attention: str, flops_per_s: float
) -> MicroCompute:
    """A rank runs its blocks on tokens/cp tokens split tp ways; the last stage adds the head."""
    tokens = lay.micro_batch * seq_len / lay.cp
    layers = layers_per_rank(shape, lay)
    per_token_block = layer_forward_flops_per_token(shape, seq_len)
    head = 2.0 * shape.vocab * shape.hidden
    fwd = tokens * (layers * per_token_block + head) / lay.tp
    attn = tokens * layers * attention_core_flops_per_token(shape, seq_len) / lay.tp
    if lay.recompute == "full":
        redo = tokens * layers * per_token_block / lay.tp
    elif lay.recompute == "selective" and attention == "naive":
        redo = attn
    else:
        redo = 0.0
    wgrad = tokens * (layers * 2.0 * active_layer_matmul_params(shape) + head) / lay.tp
    return MicroCompute(
        fwd=fwd / flops_per_s,
        bwd=(2 * fwd + redo) / flops_per_s,
        wgrad=wgrad / flops_per_s,
        attention_fwd=attn / flops_per_s,
        recompute=redo / flops_per_s,
    )


def bubble_time(schedule: str, p: int, v: int, t_f: float, t_b: float, t_w: float, m: int | None = None) -> float:
    """Idle time per step: simulated when the microbatch count m is given and the schedule is small
    enough (planner/pipeline_sim.py), else the papers' closed form (meshtrain.tools.simulator.closed_form,
    the one copy of them), floored at 0. `t_b` is the whole backward, B + W.

    GPipe and 1F1B: (p-1)(t_f + t_b) (Narayanan et al. 2021); interleaved divides it by v.
    Zero bubble (Qi et al. 2023): ZB-H1 (p-1)(t_f + t_b - 2W), ZB-H2 (p-1)(t_f + t_b - 3W).
    """
    if p <= 1:
        return 0.0
    simulated = simulated_bubble(schedule, p, v, m, t_f, t_b, t_w) if m else None
    if simulated is not None:
        return simulated
    # a custom schedule too large to simulate gets the flush schedules' bound
    name = schedule if schedule in SCHEDULES else "1f1b"
    costs = Costs(f=t_f, b=max(0.0, t_b - t_w), w=t_w)
    return max(0.0, closed_form(name, p, m or p, v, costs).bubble_time)


def _phase_costs(
    colls: list[Collective], lay: Layout, cluster: ClusterSpec
) -> tuple[dict[str, float], dict[str, float]]:
    """Per phase: total seconds per step, and the tail one last bucket or unit leaves exposed."""
    grp = groups(lay, cluster.gpus_per_node)
    total: dict[str, float] = defaultdict(float)
    tail: dict[str, float] = defaultdict(float)
    for c in colls:
        g = grp[c.group]
        total[c.phase] += c.calls * collective_time(c.kind, c.payload, g, cluster, c.chunk)
        last = collective_time(c.kind, min(c.chunk, c.payload) if c.chunk else c.payload, g, cluster)
        tail[c.phase] = max(tail[c.phase], last)
    return total, tail


def _hidden(comm: float, window: float, tail: float) -> float:
    """Exposed part of overlapped communication: what the window cannot cover, plus the last piece."""
    return max(0.0, comm - window) + tail if comm > 0 else 0.0


def _optimizer_time(
    state_bytes: float, host_bytes: float, cluster: ClusterSpec, psi_offloaded: float, param_bytes: int
) -> float:
    """Adam reads and writes every state once: memory-bound on the device, or on the host plus
    PCIe transfers (grads down, params up) when offloaded."""
    t = 2 * state_bytes / (cluster.hbm_bw_gbs * 1e9)
    if host_bytes:
        t += 2 * host_bytes / (cluster.host_bw_gbs * 1e9) + 2 * psi_offloaded * param_bytes / (
            cluster.pcie_bw_gbs * 1e9
        )
    return t


@dataclass(frozen=True)
class StepInputs:
    microbatches: int
    state_bytes: float
    host_bytes: float
    psi_sharded: float
    param_bytes: int


def step_breakdown(
    mc: MicroCompute, colls: list[Collective], lay: Layout, cluster: ClusterSpec, si: StepInputs
) -> dict[str, float]:
    """Named seconds of one optimizer step on the critical path; they add up to the step time."""
    m = si.microbatches
    total, tail = _phase_costs(colls, lay, cluster)
    tp_f, tp_b = total["exposed_fwd"] / m, total["exposed_bwd"] / m
    cp_f = max(0.0, total["attention_fwd"] / m - mc.attention_fwd)
    cp_b = max(0.0, total["attention_bwd"] / m - 2 * mc.attention_fwd)
    t_f, t_b = mc.fwd + tp_f + cp_f, mc.bwd + tp_b + cp_b
    # the zero-bubble split applies to compute; communication stays with the B pass
    out = {
        "compute": m * (mc.fwd + mc.bwd - mc.recompute),
        "recompute": m * mc.recompute,
        "tp/ep comm (exposed)": m * (tp_f + tp_b),
        "cp comm (exposed)": m * (cp_f + cp_b),
        "pipeline bubble": bubble_time(lay.schedule, lay.pp, lay.v, t_f, t_b, mc.wgrad, m),
        "pp p2p": 0.0,
        "dp/zero comm (exposed)": (
            _hidden(total["bwd_last"], mc.bwd, tail["bwd_last"])
            + _hidden(total["fwd_first"], mc.fwd, tail["fwd_first"])
            + m * _hidden(total["bwd_each"] / m, mc.bwd, tail["bwd_each"])
            + m * _hidden(total["fwd_each"] / m, mc.fwd, tail["fwd_each"])
        ),
        "optimizer step": _optimizer_time(si.state_bytes, si.host_bytes, cluster, si.psi_sharded, si.param_bytes),
    }
    if total["pipeline"]:
        per_send = total["pipeline"] / (2 * lay.v * m)
        # the critical path crosses p-1 stage boundaries filling the pipe, then one send per slot
        out["pp p2p"] = 2 * (lay.v * m + lay.pp - 1) * per_send
    return out
