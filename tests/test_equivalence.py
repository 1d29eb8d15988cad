"""The equivalence matrix: every layout trains to the single-device losses and gradient norms.

Each run goes through the real CLI and elastic launcher. The global batch is fixed (8 sequences),
so layouts differ only in how it is split over ranks and micro-steps.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY, rel_diff, train
from meshtrain.config import load_config
from meshtrain.planner import predict_run

pytestmark = pytest.mark.dist
STEPS = "training.steps=5"

LAYOUTS = {  # name: (nproc, overrides)
    "dp2": (2, ["training.micro_batch=4"]),
    "dp2-accum2": (2, ["training.micro_batch=2"]),
    "dp4": (4, ["training.micro_batch=2"]),
    "dp4-accum2": (4, ["training.micro_batch=1"]),
    "hybrid-2x2": (4, ["parallel.dp_replicate=2", "training.micro_batch=2"]),
    "dp2-small-buckets": (2, ["training.micro_batch=4", "parallel.bucket_mb=0.05"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return train(tmp_path_factory.mktemp("single"), 1, STEPS, "training.micro_batch=8")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_device(layout: str, reference: list[dict], tmp_path: Path) -> None:
    nproc, overrides = LAYOUTS[layout]
    got = train(tmp_path, nproc, STEPS, *overrides)
    assert rel_diff([r["loss"] for r in got], [r["loss"] for r in reference]) < 1e-6
    assert rel_diff([r["grad_norm"] for r in got], [r["grad_norm"] for r in reference]) < 1e-5
    # one all-reduce of every gradient per optimizer step, whatever the accumulation
    n_params = reference[0]["mem_model_state_bytes"] // 16
    assert all(r["comm_all_reduce_bytes"] == 4 * n_params for r in got)
    _planner_agrees(got[-1], nproc, [STEPS, *overrides])


TRAFFIC = ("comm_all_reduce_bytes", "comm_reduce_scatter_bytes", "comm_all_gather_bytes", "comm_wire_bytes")


def _planner_agrees(measured: dict, nproc: int, overrides: list[str], keys: tuple[str, ...] = TRAFFIC) -> None:
    """The planner's self-validation: predicted model states and traffic (`keys`) equal what the run measured."""
    predicted = predict_run(load_config(TINY, overrides), nproc)
    assert abs(predicted["mem_model_state_bytes"] - measured["mem_model_state_bytes"]) <= 0.02 * measured["mem_model_state_bytes"]
    for key in keys:
        assert predicted[key] == pytest.approx(measured.get(key, 0), abs=1), key


def test_accumulation_alone_matches_single_device(reference: list[dict], tmp_path: Path) -> None:
    got = train(tmp_path, 1, STEPS, "training.micro_batch=2")
    assert rel_diff([r["loss"] for r in got], [r["loss"] for r in reference]) < 1e-6
    assert all(r["comm_all_reduce_bytes"] == 0 for r in got)
    _planner_agrees(got[-1], 1, [STEPS, "training.micro_batch=2"])


def test_bf16_and_recomputation_train(tmp_path: Path, reference: list[dict]) -> None:
    ac = train(tmp_path / "ac", 2, STEPS, "training.micro_batch=4", "training.activation_checkpointing=full")
    assert rel_diff([r["loss"] for r in ac], [r["loss"] for r in reference]) < 1e-6
    bf16 = train(tmp_path / "bf16", 2, STEPS, "training.micro_batch=4", "training.dtype=bf16")
    assert rel_diff([r["loss"] for r in bf16], [r["loss"] for r in reference]) < 2e-2
