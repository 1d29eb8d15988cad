"""PipeDream-2BW trains to its own oracle: a single-process simulation of the delayed update
(tests/twobw_reference.py), on 4 stages and on 2 stages x 2 data-parallel pipelines, losses
and final weights within 1e-5; the same oracle without the delay (1F1B's semantics) is far off, so
the comparison would go red if the executor applied each gradient at once. All runs share one pool.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dist_utils import TINY, Run, read_metrics, train_runs
from meshtrain.config import load_config
from twobw_reference import Reference, simulate

pytestmark = pytest.mark.dist
STEPS = 5
TOL = 1e-5
# four blocks so that four stages get one each; resume is refused with 2bw (the stash is not saved)
BASE = [
    f"training.steps={STEPS}",
    f"checkpoint.interval={STEPS}",
    "checkpoint.resume=never",
    "model.n_layers=4",
    "training.grad_clip=0.5",  # low enough that clipping acts on some steps
    "data.val_fraction=0.1",
]
CASES = {  # name: (nproc, dp, overrides); two stages are covered by the data-parallel case
    # recomputation runs inside a weight version's copy of the stage
    "pp4": (4, 1, ["parallel.pp=4", "training.activation_checkpointing=full"]),
    # an evaluation between steps sets the microbatches in flight aside and runs on the master weights
    "pp2-dp2": (4, 2, ["parallel.pp=2", "training.eval_interval=2"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("twobw")
    specs = {
        name: Run(root / name, nproc, [*BASE, *extra, "parallel.pp_schedule=2bw"])
        for name, (nproc, _, extra) in CASES.items()
    }
    train_runs(list(specs.values()))
    return specs


@functools.cache
def reference(dp: int, delay: int = 1) -> Reference:
    return simulate(load_config(TINY, BASE), dp, delay)


def final_params(run: Run) -> dict[str, torch.Tensor]:
    path = run.run_dir / "checkpoints" / f"step_{STEPS:08d}"
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    tensors = {
        name[len("model.") :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in saved.items()
        if name.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load({"model": tensors}, checkpoint_id=path, no_dist=True)
    return tensors


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_2bw_meets_its_oracle(name: str, runs: dict[str, Run]) -> None:
    ref = reference(CASES[name][1])
    records = read_metrics(runs[name].run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    if name == "pp2-dp2":
        assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 5]
    for r, want, norm in zip(records, ref.losses, ref.grad_norms):
        assert rel(r["loss"], want) < TOL, f"step {r['step']}: loss {r['loss']} vs the oracle's {want}"
        assert abs(r["grad_norm"] - norm) < TOL * max(norm, 1.0), (
            f"step {r['step']}: grad norm {r['grad_norm']} vs {norm}"
        )
    got = final_params(runs[name])
    assert sorted(got) == sorted(ref.params)
    for n, want in ref.params.items():
        gap = float((got[n] - want).norm() / want.norm())
        assert gap < TOL, f"{n} is off the oracle by {gap:.3g} of its norm"
        # AdamW's m / sqrt(v) magnifies the last bits where gradients are near zero (as in DiLoCo's test)
        assert float((got[n] - want).abs().max()) < 10 * TOL, n


def test_the_oracle_tells_2bw_from_1f1b(runs: dict[str, Run]) -> None:
    """Without the delay the losses part from step 3 on (step 2 already sees W(1) instead of W(0))."""
    now, late = reference(1, delay=0), reference(1)
    got = [r["loss"] for r in read_metrics(runs["pp4"].run_dir)]
    assert got[0] == pytest.approx(now.losses[0], rel=TOL)  # batch 0 runs on W(0) either way
    assert max(rel(a, b) for a, b in zip(got[1:], now.losses[1:])) > 100 * TOL
    assert max(rel(a, b) for a, b in zip(late.losses[1:], now.losses[1:])) > 100 * TOL


def test_two_weight_versions_and_1f1b_activations(runs: dict[str, Run]) -> None:
    """Each stage holds two weight copies (the master aside) and rank r at most pp - r microbatches."""
    for name in ("pp4",):
        pp = CASES[name][0]
        for rank in range(pp):
            last = read_metrics(runs[name].run_dir, rank)[-1]
            params_bytes = last["mem_model_state_bytes"] / 4  # fp32 weights, gradient, two Adam moments
            assert last["pp_weight_versions_bytes"] == pytest.approx(2 * params_bytes)
            peaks = {r["pp_peak_inflight"] for r in read_metrics(runs[name].run_dir, rank)}
            assert max(peaks) == pp - rank, (name, rank, peaks)


def test_the_trace_is_the_last_window_and_the_schedule_tool_reads_it(runs: dict[str, Run]) -> None:
    from meshtrain.pipeline.schedules import two_bw_window
    from meshtrain.tools.trace import compare

    measured, predicted, meta = compare(runs["pp4"].run_dir)
    assert (meta["schedule"], meta["pp"], meta["microbatches"]) == ("2bw", 4, 4)
    window = two_bw_window(4, 4, False, True)
    want = sorted((a.kind.value, a.stage, a.microbatch) for acts in window for a in acts if not a.kind.is_comm)
    assert sorted((s.kind.value, s.stage, s.microbatch) for s in measured.spans) == want
    assert sorted((s.kind.value, s.stage, s.microbatch) for s in predicted.spans) == want
