"""Bubble, collective and overlap arithmetic of the time model."""

from __future__ import annotations

import pytest

from meshtrain.planner.comm import collective_time, wire_bytes
from meshtrain.planner.layout import Group, Layout
from meshtrain.planner.presets import CLUSTERS, ClusterSpec
from meshtrain.planner.timing import MicroCompute, StepInputs, bubble_time, step_breakdown
from meshtrain.planner.traffic import Collective

pytestmark = pytest.mark.pure


def test_1f1b_bubble() -> None:
    # p=4 stages, t_f=1, t_b=2: (p-1)(t_f+t_b) = 9; against m=8 microbatches of 3 s (24 s)
    # the bubble fraction is (p-1)/m = 3/8
    assert bubble_time("1f1b", 4, 1, 1.0, 2.0, 1.0) == 9.0
    assert bubble_time("1f1b", 4, 1, 1.0, 2.0, 1.0) / (8 * 3.0) == 3 / 8
    assert bubble_time("gpipe", 4, 1, 1.0, 2.0, 1.0) == 9.0
    assert bubble_time("interleaved-1f1b", 4, 2, 1.0, 2.0, 1.0) == 4.5  # / v
    # zero bubble with B = W = 1 (t_b = 2): ZB-H1 (p-1)(t_f + t_b - 2W) = 3, ZB-H2 = 0
    assert bubble_time("zb-h1", 4, 1, 1.0, 2.0, 1.0) == 3.0
    assert bubble_time("zb-h2", 4, 1, 1.0, 2.0, 1.0) == 0.0
    assert bubble_time("1f1b", 1, 1, 1.0, 2.0, 1.0) == 0.0


def test_ring_wire_bytes() -> None:
    assert wire_bytes("all_reduce", 800.0, 8) == 2 * 7 / 8 * 800  # 1400
    assert wire_bytes("reduce_scatter", 800.0, 8) == 700.0
    assert wire_bytes("all_gather", 800.0, 8) == 700.0
    assert wire_bytes("p2p", 800.0, 2) == 800.0
    assert wire_bytes("all_reduce", 800.0, 1) == 0.0


def test_alpha_beta_collective_time() -> None:
    a100 = CLUSTERS["a100-80gb"]
    # 1 GB all-reduce over 8 GPUs in a node: 14 steps * 3 us + 1.75 GB / 300 GB/s
    t = collective_time("all_reduce", 1e9, Group(8, inter_node=False), a100)
    assert t == pytest.approx(14 * 3e-6 + 1.75e9 / 300e9)
    # across nodes the per-GPU network (25 GB/s) and its latency (8 us) apply
    t = collective_time("all_gather", 1e9, Group(16, inter_node=True), a100)
    assert t == pytest.approx(15 * 8e-6 + 15 / 16 * 1e9 / 25e9)
    # four 250 MB buckets pay the latency four times
    t4 = collective_time("all_gather", 1e9, Group(16, inter_node=True), a100, bucket=250e6)
    assert t4 - t == pytest.approx(3 * 15 * 8e-6)


def test_dp_all_reduce_overlaps_with_backward() -> None:
    # a cluster without latency, 1 GB/s inside a node
    cl = ClusterSpec(
        "test", 1.0, 80.0, 8, intra_bw_gbs=1.0, inter_bw_gbs=1.0, intra_latency_us=0.0, inter_latency_us=0.0
    )
    lay = Layout(dp_shard=2)
    mc = MicroCompute(fwd=1.0, bwd=2.0, wgrad=1.0, attention_fwd=0.0, recompute=0.0)
    # all-reduce of 6 GB over 2 ranks: 2*(1/2)*6 GB / 1 GB/s = 6 s; buckets of 1 GB take 1 s each
    ar = Collective("dp grads", "all_reduce", 6e9, "grad", 1, "bwd_last", chunk=1e9)
    times = step_breakdown(
        mc, [ar], lay, cl, StepInputs(microbatches=4, state_bytes=0, host_bytes=0, psi_sharded=0, param_bytes=2)
    )
    # exposed = max(0, 6 - 2 backward) + last bucket 1 = 5
    assert times["dp/zero comm (exposed)"] == pytest.approx(5.0)
    assert times["compute"] == pytest.approx(4 * 3.0)
    assert times["pipeline bubble"] == 0.0


def test_tp_communication_is_fully_exposed() -> None:
    cl = ClusterSpec(
        "test", 1.0, 80.0, 8, intra_bw_gbs=1.0, inter_bw_gbs=1.0, intra_latency_us=0.0, inter_latency_us=0.0
    )
    lay = Layout(tp=2, pp=2)
    mc = MicroCompute(fwd=1.0, bwd=2.0, wgrad=1.0, attention_fwd=0.0, recompute=0.0)
    # 4 all-reduces of 1 GB per step over 2 ranks: 1 s each, none hidden
    tp = [
        Collective("tp", "all_reduce", 1e9, "tp", 2, "exposed_fwd"),
        Collective("tp", "all_reduce", 1e9, "tp", 2, "exposed_bwd"),
    ]
    times = step_breakdown(
        mc, tp, lay, cl, StepInputs(microbatches=2, state_bytes=0, host_bytes=0, psi_sharded=0, param_bytes=2)
    )
    assert times["tp/ep comm (exposed)"] == pytest.approx(4.0)
    # the bubble grows with the comm per microbatch: (p-1)(t_f + t_b) = 1 * ((1 + 1) + (2 + 1)) = 5
    assert times["pipeline bubble"] == pytest.approx(5.0)


def test_bubble_and_in_flight_come_from_the_simulator_when_m_is_known() -> None:
    from meshtrain.pipeline.schedules import SCHEDULES
    from meshtrain.planner.memory import in_flight_microbatches
    from meshtrain.tools.simulator import Costs, simulate

    # ZB-H2 with T_F = T_B = T_W: the closed form's zero holds per rank only; the makespan keeps
    # (p-1) T_F while the last rank waits for its first forward, and the simulator says so.
    assert bubble_time("zb-h2", 4, 1, 1.0, 2.0, 1.0) == 0.0
    assert bubble_time("zb-h2", 4, 1, 1.0, 2.0, 1.0, m=8) == 3.0
    # where the closed form's assumptions hold, both agree (ZB-H1, T_W <= T_F, m >= p)
    assert bubble_time("zb-h1", 4, 1, 2.0, 3.0, 1.0, m=8) == bubble_time("zb-h1", 4, 1, 2.0, 3.0, 1.0) == 9.0
    peaks = simulate(SCHEDULES["interleaved-1f1b"](4, 8, 2), Costs()).peak_activations
    assert [in_flight_microbatches("interleaved-1f1b", 4, 2, 8, r) for r in range(4)] == list(peaks)
