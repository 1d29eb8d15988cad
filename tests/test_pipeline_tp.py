"""Pipeline x tensor (and sequence) parallelism through the CLI: pp x tp and pp x dp x tp on one mesh.

The model has 8 query and 4 kv heads (tiny.toml has 4 and 2) so that tp = 2 splits grouped-query
attention; the single-process reference uses the same model. Each run checks losses and grad norms
against the reference, and the pipeline's P2P bytes against the planner (1/tp of the activation under
SP). Checkpoints then move between a pp x dp x tp run and a plain one, in both directions.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import TINY, rel_diff, train
from meshtrain.config import load_config
from meshtrain.planner import predict_run

pytestmark = pytest.mark.dist
BASE = ("training.steps=3", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "training.micro_batch=2",
        "checkpoint.interval=2")
PP_TP = ("parallel.pp=2", "parallel.tp=2")
SP = "parallel.sequence_parallel=true"
LAYOUTS = {  # name: (nproc, overrides)
    "pp2-tp2-1f1b": (4, [*PP_TP, "parallel.pp_schedule=1f1b"]),
    "pp2-tp2-sp-interleaved": (4, [*PP_TP, SP, "parallel.pp_chunks=2", "parallel.pp_schedule=interleaved-1f1b"]),
    "pp2-dp2-tp2-sp-zb": (8, [*PP_TP, SP, "parallel.pp_schedule=zb-h1"]),  # the 3-D mesh, B/W split
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict]]]:
    out = {}
    for name, (nproc, overrides) in {"single": (1, []), **LAYOUTS}.items():
        run_dir = tmp_path_factory.mktemp(name)
        out[name] = run_dir, train(run_dir, nproc, *BASE, *overrides)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pp_tp_layout_matches_single_device(layout: str, runs: dict) -> None:
    nproc, overrides = LAYOUTS[layout]
    ref, got = runs["single"][1], runs[layout][1]
    assert rel_diff([r["loss"] for r in got], [r["loss"] for r in ref]) < 1e-5
    assert rel_diff([r["grad_norm"] for r in got], [r["grad_norm"] for r in ref]) < 1e-5
    assert all(r["comm_tp_block_bytes"] > 0 for r in got)
    p2p = predict_run(load_config(TINY, [*BASE, *overrides]), nproc)["comm_p2p_bytes"]
    assert all(r["comm_p2p_bytes"] == p2p for r in got), (p2p, [r["comm_p2p_bytes"] for r in got])
    # one trace per stage (written by tp rank 0 of the first data-parallel replica)
    assert sorted(p.name for p in (runs[layout][0] / "pp_trace").iterdir()) == ["rank0.json", "rank1.json"]


def _resume_from(source: Path, step: int, target: Path) -> None:
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)


def test_checkpoints_cross_between_pp_tp_and_plain_runs(runs: dict, tmp_path: Path) -> None:
    """Stages save their own blocks, tp ranks full-shape DTensors: the keys and shapes of a plain run."""
    ref = runs["single"][1][2:]
    _resume_from(runs["pp2-dp2-tp2-sp-zb"][0], 2, tmp_path / "to_plain")
    _resume_from(runs["single"][0], 2, tmp_path / "to_pp_tp")
    plain = train(tmp_path / "to_plain", 1, *BASE, "checkpoint.resume=auto")
    pp_tp = train(tmp_path / "to_pp_tp", 4, *BASE, *LAYOUTS["pp2-tp2-1f1b"][1], "checkpoint.resume=auto")
    for got in (plain, pp_tp):
        assert [r["step"] for r in got] == [3]
        assert rel_diff([r["loss"] for r in got], [r["loss"] for r in ref]) < 1e-5
