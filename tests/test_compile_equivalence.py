"""torch.compile (training.compile) trains to the single-device, uncompiled losses and gradient norms
under data parallelism, ZeRO-3, TP + SP, pipelines (1F1B, and ZB-H1 with the B/W split),
activation checkpointing with bf16, and the whole-model mode; and compiling keeps parameter names.

All compiled runs share one pool (tests/dist_utils.py) and one TORCHINDUCTOR_CACHE_DIR in the
module's temp folder, so repeated block shapes reuse compiled code across runs and ranks.
"""

from __future__ import annotations

import pytest
import torch

from checks import assert_same_training, rel_diff
from dist_utils import Run, train_named

STEPS = 3
BASE = [f"training.steps={STEPS}"]
BLOCKS = "training.compile=blocks"
SPECS = {  # name: (nproc, overrides); "single" is the uncompiled oracle
    "single": (1, ["training.micro_batch=8"]),
    "dp2": (2, [BLOCKS, "training.micro_batch=4"]),
    "dp2-model": (2, ["training.compile=model", "training.micro_batch=4"]),
    "z3-dp2": (2, [BLOCKS, "parallel.zero_stage=3", "training.micro_batch=4"]),
    "tp2-sp": (2, [BLOCKS, "parallel.tp=2", "parallel.sequence_parallel=true", "training.micro_batch=8"]),
    "pp2-1f1b": (2, [BLOCKS, "parallel.pp=2"]),
    "pp2-zb-h1": (2, [BLOCKS, "parallel.pp=2", "parallel.pp_schedule=zb-h1"]),
    "dp2-recompute-bf16": (
        2,
        [BLOCKS, "training.micro_batch=4", "training.activation_checkpointing=full", "training.dtype=bf16"],
    ),
}
FP32 = [name for name in SPECS if name != "single" and "bf16" not in name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, list[dict]]]:
    root = tmp_path_factory.mktemp("compile")
    with pytest.MonkeyPatch.context() as env:  # conftest's per-test folder is not set up yet for a module fixture
        env.setenv("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
        return train_named({name: Run(root / name, n, [*BASE, *o]) for name, (n, o) in SPECS.items()})


@pytest.mark.dist
@pytest.mark.parametrize("layout", FP32)
def test_compiled_layout_matches_uncompiled_single_device(layout: str, runs: dict) -> None:
    # inductor fuses and reorders fp32 sums like a change of layout does: the tolerance of the
    # TP and pipeline equivalence tests (reassociated fp32), not DP's exact-order one
    assert_same_training(runs[layout][1], runs["single"][1], loss=1e-5, grad_norm=1e-5)


@pytest.mark.dist
def test_the_runs_really_compiled(runs: dict) -> None:
    """Inductor wrote kernels into the shared cache: the switch is not a no-op (the uncompiled run
    alone writes none there)."""
    cache = runs["single"][0].run_dir.parent / "inductor"
    assert len(list(cache.rglob("*.so"))) >= 2, sorted(p.name for p in cache.rglob("*"))[:20]


@pytest.mark.dist
def test_compiled_recompute_bf16_stays_close(runs: dict) -> None:
    """bf16 moves the numbers off fp32's (so it really ran) within the bf16 bound of test_equivalence."""
    got, ref = runs["dp2-recompute-bf16"][1], runs["single"][1]
    assert 1e-6 < rel_diff([r["loss"] for r in got], [r["loss"] for r in ref]) < 2e-2


def _tiny_model(mode: str) -> torch.nn.Module:
    from dist_utils import TINY
    from meshtrain.compile import apply_compile
    from meshtrain.config import load_config
    from meshtrain.model import build_model

    model = build_model(load_config(TINY, []).model, torch.device("cpu"), seed=0)
    apply_compile([model], mode)
    return model


@pytest.mark.pure
@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_compile_keeps_parameter_names(mode: str) -> None:
    """Checkpoints, HF export and DCP read state_dict keys: compiling must not add _orig_mod."""
    assert list(_tiny_model(mode).state_dict()) == list(_tiny_model("none").state_dict())


@pytest.mark.pure
def test_blocks_mode_compiles_every_block_and_none_compiles_nothing() -> None:
    assert all(block.body is not None for block in _tiny_model("blocks").model.layers.values())
    assert all(block.body is None for block in _tiny_model("none").model.layers.values())
