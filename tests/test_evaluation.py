"""The validation loss (training.eval_interval, `meshtrain eval`), TensorBoard and `meshtrain plot`.

One pool of gloo ranks trains every layout with evaluation after each step: val_loss equals the
single process's under dp, ZeRO-3, tp + sp, a pipeline (1f1b on its forward-only schedule) and MoE
under expert parallelism; evaluation leaves training exactly as it was (losses, gradient norms,
the experts' counted load); the single process's val_loss equals an oracle computed here, by hand,
from the run's checkpoint; its TensorBoard events hold what metrics.jsonl holds; `meshtrain eval`
and `meshtrain plot` read the runs back. Without processes: every forward-only pipeline schedule
runs each forward once and cannot deadlock; a missing validation split or tensorboard package is
one ConfigError line before anything starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checks import rel_diff
from dist_utils import TINY, Run, train_named
from meshtrain.config import ConfigError, load_config
from meshtrain.pipeline.schedules import Kind, Layout, forward_only
from meshtrain.tools.schedule_check import check_deadlock
from meshtrain.validate import validate

# 20k synthetic tokens: 624 sequences, the last 13 held out (a global batch is 8)
DATA = ["data.max_tokens=20000", "data.val_fraction=0.02"]
EVAL = ["training.steps=2", *DATA, "training.eval_interval=1", "training.eval_batches=1"]
# A large bias step and 3 steps (sign updates can cancel out after 2), so that the balancing bias
# really routes tokens differently by the last step.
MOE = [
    "training.steps=3",
    "model.n_experts=4",
    "model.expert_ffn_dim=32",
    "model.top_k=2",
    "model.load_balance=bias",
    "model.bias_update_rate=0.05",
]
LAYOUTS = {  # name: (nproc, overrides on top of EVAL, the single-process reference)
    "dp2": (2, [], "single"),
    "zero3-dp2": (2, ["parallel.zero_stage=3"], "single"),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"], "single"),
    "pp2-1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"], "single"),
    "moe-ep2": (2, [*MOE, "parallel.ep=2"], "moe-single"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, list[dict]]]:
    root = tmp_path_factory.mktemp("eval")
    specs = {
        "single": Run(root / "single", 1, [*EVAL, "checkpoint.interval=2", "logging.tensorboard=true"]),
        # the same data split, never evaluated: what training must be with evaluation on
        "single-off": Run(root / "single-off", 1, ["training.steps=2", *DATA]),
        "moe-single": Run(root / "moe-single", 1, [*EVAL, *MOE, "checkpoint.interval=3"]),
    }
    specs.update({name: Run(root / name, n, [*EVAL, *o]) for name, (n, o, _) in LAYOUTS.items()})
    return train_named(specs)


def _val(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS)
def test_val_loss_matches_the_single_process(layout: str, runs: dict) -> None:
    got, ref = _val(runs[layout][1]), _val(runs[LAYOUTS[layout][2]][1])
    assert [s for s, _ in got] == [s for s, _ in ref] == list(range(1, len(ref) + 1)) and len(ref) >= 2
    assert rel_diff([v for _, v in got], [v for _, v in ref]) < 1e-5, (got, ref)


@pytest.mark.dist
def test_evaluation_leaves_training_exactly_as_it_was(runs: dict) -> None:
    on, off = runs["single"][1], runs["single-off"][1]
    assert [(r["loss"], r["grad_norm"]) for r in on] == [(r["loss"], r["grad_norm"]) for r in off]
    assert all("val_loss" not in r for r in off)
    # Evaluation routes tokens too: the experts' counted load (which moves the bias) is training's alone,
    # top_k assignments per token of the global batch (8 x 32), summed over the ranks.
    for name in ("moe-single", "moe-ep2"):
        for rec in runs[name][1]:
            assert {layer: sum(load) for layer, load in rec["moe_expert_load"].items()} == {
                f"model.layers.{i}.mlp": 2 * 8 * 32 for i in range(2)
            }


@pytest.mark.dist
def test_single_process_val_loss_equals_a_hand_computed_oracle(runs: dict) -> None:
    """The checkpoint of the last step, run by hand on the validation split's first global batch."""
    from meshtrain.data import build_dataset, build_tokenizer
    from meshtrain.generate import load_for_generation

    run, records = runs["single"]
    model, _, step = load_for_generation(run.run_dir)
    cfg = load_config(TINY, run.overrides)
    val = build_dataset(cfg.data, build_tokenizer("byte"), cfg.training.seq_len, cfg.training.seed, split="val")
    tokens, targets = val.batch(torch.arange(cfg.training.global_batch).numpy())
    with torch.no_grad():
        logits = model(tokens)
    oracle = float(F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten()))
    assert step == records[-1]["step"] == 2
    assert records[-1]["val_loss"] == pytest.approx(oracle, rel=1e-6)
    assert records[-1]["val_ppl"] == pytest.approx(torch.tensor(oracle).exp().item(), rel=1e-6)


@pytest.mark.dist
def test_tensorboard_holds_the_metrics_records(runs: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, records = runs["single"]
    events = EventAccumulator(str(run.run_dir / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/loss": "loss",
        "val/loss": "val_loss",
        "val/ppl": "val_ppl",
        "train/lr": "lr",
        "train/grad_norm": "grad_norm",
        "perf/tokens_per_s": "tokens_per_s",
        "perf/mfu": "mfu",
        "memory/model_state_bytes": "mem_model_state_bytes",
        "memory/peak_rss_bytes": "peak_rss_bytes",
        "comm/all_reduce_bytes": "comm_all_reduce_bytes",
    }
    assert set(expected) <= tags, sorted(tags)
    for tag, key in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], tag


@pytest.mark.dist
def test_eval_and_plot_commands_read_the_run(runs: dict, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`meshtrain eval` on the checkpoint gives training's last val_loss (MoE's balancing biases
    loaded: they route), and within 1% of it with --quantize int8; `meshtrain plot` draws four PNGs."""
    from meshtrain.cli import main

    for name in ("single", "moe-single"):
        run, records = runs[name]
        assert main(["eval", "--run-dir", str(run.run_dir)]) == 0
        printed = capsys.readouterr().out.split()
        assert printed[0] == "val_loss" and float(printed[1]) == pytest.approx(records[-1]["val_loss"], abs=2e-6)
    # LLM.int8 (meshtrain.model.int8): within 1% of the fp32 loss, and it says which matmul ran
    assert main(["eval", "--run-dir", str(runs["single"][0].run_dir), "--quantize", "int8"]) == 0
    loss_line, int8_line = capsys.readouterr().out.splitlines()
    assert float(loss_line.split()[1]) == pytest.approx(runs["single"][1][-1]["val_loss"], rel=0.01)
    assert int8_line.startswith("LLM.int8 (threshold 6)") and "| matmul: " in int8_line  # path: test_int8.py
    assert main(["plot", "--run-dir", str(runs["pp2-1f1b"][0].run_dir), "--out", str(tmp_path)]) == 0
    for name in ("loss", "throughput", "memory", "comm"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name


@pytest.mark.pure
@pytest.mark.parametrize(
    "layout",
    [Layout.looped(2), Layout.looped(4), Layout.looped(2, 2), Layout.looped(4, 3), Layout(2, (0, 0, 1, 1))],
    ids=["pp2", "pp4", "pp2v2", "pp4v3", "two-local-stages"],
)
def test_forward_only_schedules_run_every_forward_once_without_deadlock(layout: Layout) -> None:
    schedule = forward_only(layout, 6)
    check_deadlock(schedule)
    computes = [(a.stage, a.microbatch) for actions in schedule for a in actions if not a.kind.is_comm]
    assert sorted(computes) == [(s, i) for s in range(layout.num_stages) for i in range(6)]
    assert {a.kind for actions in schedule for a in actions} == {Kind.F, Kind.SEND_F, Kind.RECV_F}
    # stages on one rank hand over locally: only the hops between ranks are messages
    hops = sum(layout.rank_of(s) != layout.rank_of(s + 1) for s in range(layout.num_stages - 1))
    assert sum(a.kind == Kind.SEND_F for actions in schedule for a in actions) == 6 * hops


@pytest.mark.pure
def test_evaluating_without_a_validation_split_is_refused_in_one_line() -> None:
    cfg = load_config(TINY, ["training.eval_interval=5"])
    with pytest.raises(ConfigError, match="data.val_fraction") as err:
        validate(cfg, 1)
    assert "\n" not in str(err.value)
    assert validate(load_config(TINY, ["training.eval_interval=5", "data.val_fraction=0.01"]), 1).training.eval_interval


@pytest.mark.pure
def test_tensorboard_without_its_package_is_refused_before_spawning(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install tensorboard") as err:
        validate(load_config(TINY, ["logging.tensorboard=true"]), 1)
    assert "\n" not in str(err.value)
