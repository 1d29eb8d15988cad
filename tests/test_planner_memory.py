"""Memory formulas against the ZeRO paper's and Korthikanti et al.'s worked numbers."""

from __future__ import annotations

import pytest

from meshtrain.planner.memory import (
    FP32,
    MIXED,
    StateDtypes,
    in_flight_microbatches,
    layer_activation_bytes,
    model_state_bytes,
)
from meshtrain.planner.presets import MODELS

pytestmark = pytest.mark.pure

PSI, N = 7.5e9, 64  # the ZeRO paper's Figure 1 example


def _states(stage: int, dt: StateDtypes = MIXED, offload: bool = False) -> float:
    out = model_state_bytes(PSI, N, stage, dt, offload)
    return out["params"] + out["grads"] + out["optimizer"]


def test_zero_family_mixed_precision() -> None:
    assert _states(0) == 16 * PSI  # 120 GB
    assert _states(1) == pytest.approx(4 * PSI + 12 * PSI / N)  # 30 + 1.40625 = 31.4 GB
    assert _states(2) == pytest.approx(2 * PSI + 14 * PSI / N)  # 15 + 1.640625 = 16.6 GB
    assert _states(3) == pytest.approx(16 * PSI / N)  # 1.875 GB
    assert _states(1) == pytest.approx(31.40625e9)


def test_zero_family_fp32() -> None:
    # fp32 params 4 + grads 4 + Adam m, v 8, no master copy
    assert _states(0, FP32) == 16 * PSI
    assert _states(1, FP32) == pytest.approx(8 * PSI + 8 * PSI / N)
    assert _states(2, FP32) == pytest.approx(4 * PSI + 12 * PSI / N)
    assert _states(3, FP32) == pytest.approx(16 * PSI / N)


def test_offload_moves_optimizer_state_to_host() -> None:
    out = model_state_bytes(PSI, N, 2, MIXED, offload=True)
    assert out["optimizer"] == 0 and out["grads"] == 0
    assert out["host"] == pytest.approx(14 * PSI / N)  # (2 grad + 12 optimizer) psi / N
    assert out["params"] == 2 * PSI


GPT3 = MODELS["gpt3-175b"]
S, B, H, A = 2048, 1, 12288, 96
SBH = S * B * H  # 25,165,824


def _act(tp: int, sp: bool, recompute: str) -> float:
    return layer_activation_bytes(GPT3, S * B, S, 2, "naive", tp, sp, recompute)


def test_korthikanti_no_parallelism() -> None:
    # sbh(34 + 5as/h) = sbh(34 + 5*96*2048/12288) = sbh(34 + 80) = 114 sbh = 2,868,903,936 bytes
    assert _act(1, False, "none") == 34 * SBH + 5 * A * S * S * B == 2_868_903_936


def test_korthikanti_tensor_and_sequence_parallel() -> None:
    # TP alone: sbh(10 + 24/t + 5as/(ht)) with t=8 -> sbh(10 + 3 + 10) = 23 sbh
    assert _act(8, False, "none") == pytest.approx(23 * SBH)
    # TP + SP: everything / t -> 114 sbh / 8
    assert _act(8, True, "none") == pytest.approx(114 * SBH / 8)
    # selective recompute with SP: 34 sbh / t
    assert _act(8, True, "selective") == pytest.approx(34 * SBH / 8)
    # full recompute keeps the block input: 2 sbh (/ t with SP)
    assert _act(1, False, "full") == 2 * SBH
    assert _act(8, True, "full") == 2 * SBH / 8


def test_flash_attention_drops_the_quadratic_term() -> None:
    flash = layer_activation_bytes(GPT3, S * B, S, 2, "flash", 1, False, "none")
    # 34 sbh, plus the fp32 log-sum-exp: 4 bytes * a heads * s tokens
    assert flash == 34 * SBH + 4 * A * S


def test_in_flight_microbatches_per_schedule() -> None:
    p, m = 8, 64
    assert in_flight_microbatches("1f1b", p, 1, m, rank=0) == 8  # p on the first stage
    assert in_flight_microbatches("1f1b", p, 1, m, rank=p - 1) == 1  # one on the last
    assert in_flight_microbatches("gpipe", p, 1, m, rank=0) == 64  # all m
    assert in_flight_microbatches("zb-h1", p, 1, m, rank=0) == 8
    assert in_flight_microbatches("zb-h2", p, 1, m, rank=0) == 15  # 2p - 1
    # interleaved, v = 4: p (1 + (p-1)/(p v)) = 8 * (1 + 7/32) = 9.75
    assert in_flight_microbatches("interleaved-1f1b", p, 4, m, rank=0) == pytest.approx(9.75)
    assert in_flight_microbatches("1f1b", p, 1, 3, rank=0) == 3  # never more than m
    assert in_flight_microbatches("1f1b", 1, 1, 16, rank=0) == 1
