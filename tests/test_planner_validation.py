"""The planner's self-validation on pipelined runs: predicted per-rank bytes equal the measured ones.

(DP, ZeRO and TP runs are checked where those layouts' equivalence tests already train.)
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY, train
from meshtrain.config import load_config
from meshtrain.planner import predict_run

pytestmark = pytest.mark.dist
KEYS = ("mem_model_state_bytes", "comm_all_reduce_bytes", "comm_p2p_bytes", "comm_wire_bytes")


@pytest.mark.parametrize("nproc, overrides", [
    (2, ["parallel.pp=2"]),
    (4, ["parallel.pp=2", "parallel.pp_chunks=2", "parallel.pp_schedule=interleaved-1f1b", "model.n_layers=4"]),
])
def test_planner_predicts_pipelined_runs(nproc: int, overrides: list[str], tmp_path: Path) -> None:
    overrides = ["training.steps=2", "training.micro_batch=2", *overrides]
    measured = train(tmp_path, nproc, *overrides)[-1]
    predicted = predict_run(load_config(TINY, overrides), nproc)
    for key in KEYS:
        assert predicted[key] == pytest.approx(measured[key], rel=1e-9, abs=1), key
