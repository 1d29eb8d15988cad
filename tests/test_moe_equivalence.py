"""Mixture-of-experts models train to the single-device losses under data parallelism, ZeRO-3
(experts replicated), expert parallelism (ep 2 and 4, with DP), ep with ZeRO-1 and ZeRO-3 (experts
sharded over the ranks that hold them), with pipelines and with context parallelism (the auxiliary
loss counts whole sequences over cp); with accumulation, capacity dropping, the balancing bias,
sigmoid routing with shared experts and a leading dense block, and recomputation. The bias is the
same on every layout (it decides routing, so the losses would part otherwise) and resumes from a
checkpoint; every rank sends and holds what the planner predicts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from checks import (
    TRAFFIC,
    assert_counters_honest,
    assert_planner_agrees,
    assert_same_training,
    counted,
    recorded,
    rel_diff,
    zero_padding_slack,
)
from dist_utils import Run, train_named, train_runs

pytestmark = pytest.mark.dist
BASE = ("training.steps=5", "model.n_experts=4", "model.expert_ffn_dim=32", "model.top_k=2")
VARIANTS = {  # reference name: overrides shared by it and its layouts
    "plain": ["checkpoint.interval=3"],
    "capacity": ["model.capacity_factor=1.0"],
    "bias": ["model.load_balance=bias", "model.bias_update_rate=0.01", "checkpoint.interval=3"],
    "deepseek": [
        "model.router_score=sigmoid",
        "model.n_shared_experts=1",
        "model.first_dense_layers=1",
        "model.z_loss_coef=0.001",
    ],
}
# 50 steps on the README corpus with no balancing, the auxiliary loss, and the bias
BALANCE_RUN = [*BASE, "training.steps=50", "training.micro_batch=8", "data.source=stdlib", "data.max_tokens=200000"]
BALANCE = {
    "none": ["model.load_balance=none"],
    "aux": ["model.aux_loss_coef=0.1"],
    "bias": ["model.load_balance=bias", "model.bias_update_rate=0.01"],
}
LAYOUTS = {  # name: (variant, nproc, overrides)
    "dp2": ("plain", 2, ["training.micro_batch=4"]),
    "bias-dp2-accum2": ("bias", 2, ["training.micro_batch=2"]),
    "bias-z3-dp4": ("bias", 4, ["training.micro_batch=2", "parallel.zero_stage=3"]),
    # expert parallelism: each rank holds n_experts / ep experts, tokens travel by all-to-all
    "ep2": ("plain", 2, ["training.micro_batch=4", "parallel.ep=2", "checkpoint.interval=3"]),
    "ep4-accum2": ("plain", 4, ["training.micro_batch=1", "parallel.ep=4"]),
    "ep2-dp4": ("plain", 4, ["training.micro_batch=2", "parallel.ep=2"]),
    # ZeRO shards each expert's state over the 2 ranks holding it, the dense state over all 4
    "ep2-z1-dp4": ("plain", 4, ["training.micro_batch=2", "parallel.ep=2", "parallel.zero_stage=1"]),
    "ep2-z3-dp4": ("plain", 4, ["training.micro_batch=2", "parallel.ep=2", "parallel.zero_stage=3"]),
    # context parallelism: each rank holds half of every sequence (ep borrows the cp ranks)
    "ep2-cp2": ("plain", 2, ["training.micro_batch=8", "parallel.ep=2", "parallel.cp=2"]),
    "deepseek-ep2-cp2-dp2": ("deepseek", 4, ["training.micro_batch=4", "parallel.ep=2", "parallel.cp=2"]),
    "capacity-ep2": ("capacity", 2, ["training.micro_batch=4", "parallel.ep=2"]),
    "bias-ep2-recompute": (
        "bias",
        2,
        ["training.micro_batch=4", "parallel.ep=2", "training.activation_checkpointing=full"],
    ),
    "deepseek-ep2": ("deepseek", 2, ["training.micro_batch=4", "parallel.ep=2"]),
    # pipelined (1F1B, 2 stages x dp 2); deepseek's dense first block leaves stage 0 with no MoE layer
    "ep2-pp2": ("plain", 4, ["training.micro_batch=2", "parallel.pp=2", "parallel.ep=2"]),
    "deepseek-ep2-pp2": ("deepseek", 4, ["training.micro_batch=2", "parallel.pp=2", "parallel.ep=2"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, list[dict]]]:
    root = tmp_path_factory.mktemp("moe")
    specs = {v: Run(root / v, 1, [*BASE, *o, "training.micro_batch=8"]) for v, o in VARIANTS.items()}
    for name, (variant, nproc, overrides) in LAYOUTS.items():
        specs[name] = Run(root / name, nproc, [*BASE, *VARIANTS[variant], *overrides])
    for mode, overrides in BALANCE.items():
        specs[f"balance-{mode}"] = Run(root / f"balance-{mode}", 1, [*BALANCE_RUN, *overrides])
    return train_named(specs)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_layout_matches_single_device(layout: str, runs: dict) -> None:
    assert_same_training(runs[layout][1], runs[LAYOUTS[layout][0]][1], loss=1e-5, grad_norm=1e-5)


def test_each_variant_really_changes_the_routing(runs: dict) -> None:
    """Capacity drops tokens, the bias moves the load, and every variant trains differently."""
    plain, capacity, bias = (runs[v][1] for v in ("plain", "capacity", "bias"))
    assert all(r["moe_drop_fraction"] == 0 for r in plain) and all(r["moe_drop_fraction"] > 0 for r in capacity)
    assert all(r["moe_aux_loss"] > 0 for r in plain) and all(r["moe_aux_loss"] == 0 for r in bias)
    losses = [tuple(r["loss"] for r in runs[v][1]) for v in VARIANTS]
    assert len(set(losses)) == len(VARIANTS)
    # the layouts see the same global load every step (it is summed over the ranks)
    assert [r["moe_expert_load"] for r in runs["bias-z3-dp4"][1]] == [r["moe_expert_load"] for r in bias]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_layouts_hold_and_send_what_the_planner_predicts(layout: str, runs: dict) -> None:
    run, _ = runs[layout]
    keys = TRAFFIC
    if layout == "capacity-ep2":  # dropped assignments never travel: how many is the data's, not the planner's
        keys = tuple(k for k in TRAFFIC if k not in ("comm_all_to_all_bytes", "comm_wire_bytes"))
    assert_planner_agrees(run, keys, state_slack=zero_padding_slack(run))


@pytest.mark.parametrize("layout", [n for n in LAYOUTS if "zero_stage" not in str(LAYOUTS[n][2])])
def test_reported_traffic_is_what_torch_distributed_was_handed(layout: str, runs: dict) -> None:
    run = runs[layout][0]
    assert_counters_honest(run, ["comm_all_reduce_bytes"])
    if "parallel.ep=" in str(run.overrides):
        # A rank reports its own tokens' rows of each exchange (out in the dispatch, back in the
        # combine); the wrapper sees each call's input. Per rank they differ with the routing; over
        # the ranks both are every row moved, so the totals must agree.
        ranks = range(run.nproc)
        reported = sum(recorded(run, r, "comm_all_to_all_bytes") for r in ranks)
        assert reported == sum(counted(run, r).get("all_to_all", 0) for r in ranks) > 0


def test_the_weights_of_the_balancing_losses(runs: dict) -> None:
    """At initialisation the router is near uniform, so sum_i f_i P_i is near 1/E and each layer's
    auxiliary loss, averaged over the step's sequences, near its coefficient (0.01; 2 MoE layers);
    z-loss is off. With it on (one MoE layer), 0.001 times the mean of logsumexp^2 over near-zero
    logits, about (ln 4)^2."""
    first = runs["plain"][1][0]
    assert 2 * 0.008 < first["moe_aux_loss"] < 2 * 0.0125 and first["moe_z_loss"] == 0
    z = runs["deepseek"][1][0]["moe_z_loss"]
    assert 0.5 * 0.001 * 1.386**2 < z < 2 * 0.001 * 1.386**2


def _imbalance(records: list[dict]) -> float:
    """max/mean tokens per expert, averaged over the layers and the last 10 steps."""
    per_step = [
        sum(max(v) / (sum(v) / len(v)) for v in r["moe_expert_load"].values()) / len(r["moe_expert_load"])
        for r in records[-10:]
    ]
    return sum(per_step) / len(per_step)


def test_balancing_lowers_the_load_imbalance(runs: dict) -> None:
    """50 steps on Python source (the README corpus), on which an unbalanced router collapses onto
    two experts within the run: the auxiliary loss and the bias each keep the measured max/mean
    load clearly lower."""
    imbalance = {m: _imbalance(runs[f"balance-{m}"][1]) for m in BALANCE}
    assert imbalance["none"] > 1.8, imbalance  # the collapse the balancing must prevent
    assert imbalance["aux"] < 0.85 * imbalance["none"] and imbalance["bias"] < 0.85 * imbalance["none"], imbalance


def test_checkpoints_cross_ep_degrees_and_keep_the_bias(runs: dict, tmp_path: Path) -> None:
    """Experts are saved under their global names: ep2's step-3 checkpoint resumes on one process
    and at ep4, one process's at ep2, ep2 x ZeRO-3's at ep4 without ZeRO; bias-dp2-accum2's, biases
    included, on one process and on 4 ranks under ZeRO-3. Each with the single device's losses (and,
    for the bias, its load)."""
    targets = {  # name: (nproc, overrides, whose checkpoint, reference)
        "one": (1, ["training.micro_batch=8"], "ep2", "plain"),
        "ep4": (4, ["training.micro_batch=2", "parallel.ep=4"], "ep2", "plain"),
        "to-ep2": (2, ["training.micro_batch=4", "parallel.ep=2"], "plain", "plain"),
        "ep4-from-ep2-z3": (4, ["training.micro_batch=2", "parallel.ep=4"], "ep2-z3-dp4", "plain"),
        "bias-one": (1, [*VARIANTS["bias"], "training.micro_batch=8"], "bias-dp2-accum2", "bias"),
        "bias-z3-dp4": (
            4,
            [*VARIANTS["bias"], "training.micro_batch=2", "parallel.zero_stage=3"],
            "bias-dp2-accum2",
            "bias",
        ),
    }
    for name, (_, _, source, _) in targets.items():
        src = runs[source][0].run_dir / "checkpoints" / "step_00000003"
        shutil.copytree(src, tmp_path / name / "checkpoints" / src.name)
    tails = train_runs(
        [Run(tmp_path / n, k, [*BASE, *o, "checkpoint.resume=auto"]) for n, (k, o, _, _) in targets.items()]
    )
    for (name, (*_, ref)), tail in zip(targets.items(), tails):
        assert [r["step"] for r in tail] == [4, 5], name
        assert rel_diff([r["loss"] for r in tail], [r["loss"] for r in runs[ref][1][3:]]) < 1e-5, name
    assert tails[4][-1]["moe_expert_load"] == runs["bias"][1][-1]["moe_expert_load"]


def test_an_expert_parallel_rank_holds_its_share_of_the_experts(runs: dict) -> None:
    """Model states per rank: ep2 holds half the experts, ep4 a quarter (16 bytes per element:
    fp32 weight, gradient and the two Adam moments), everything else whole. Measured against the
    parameter count written here: 2 MoE blocks x 4 experts x 3 x 64 x 32. Under ZeRO on 4 ranks
    with ep2, the dense state is split 4 ways and the experts' 2 ways (the ranks holding them):
    ZeRO-1 the 8 bytes of Adam, ZeRO-3 all 16."""
    experts = 2 * 4 * 3 * 64 * 32
    whole = runs["dp2"][1][0]["mem_model_state_bytes"]
    assert whole - runs["ep2"][1][0]["mem_model_state_bytes"] == 16 * experts // 2
    assert whole - runs["ep4-accum2"][1][0]["mem_model_state_bytes"] == 16 * experts * 3 // 4
    dense, mine = whole // 16 - experts, experts // 2
    z1 = 8 * (dense + mine) + 8 * dense / 4 + 8 * mine / 2
    z3 = 16 * dense / 4 + 16 * mine / 2
    slack = zero_padding_slack(runs["ep2-z3-dp4"][0])
    for name, expected in (("ep2-z1-dp4", z1), ("ep2-z3-dp4", z3)):
        assert abs(runs[name][1][0]["mem_model_state_bytes"] - expected) <= slack, name
