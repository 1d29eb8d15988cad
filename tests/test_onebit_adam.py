"""1-bit Adam (meshtrain.compression): the compressed all-reduce against a single-process simulation
written here (bit for bit, over rounds, so the error feedback matters, on a padded length); the
bytes after the freeze against the formula written here, by meshtrain's counters and by the wrapper
around torch.distributed; training: AdamW's losses bit for bit until the freeze, then still learning,
on dp, pp x dp and cp x dp, and a resume past the freeze (error buffers reset); the refusals.

The byte formula, for a rank's momentum of n elements on w ranks in blocks of B elements, padded
to P = ceil(n / wB) * wB (whole blocks in each rank's chunk):
  all-to-all   P/8 bytes of the workers' signs + 4P/B of their fp32 scales
  all-gather   P/8 bytes of the servers' signs + 4P/B of theirs
  wire         (w-1)/w x (P/4 + 8P/B), against the fp32 all-reduce's 2(w-1)/w x 4n: 1/32 + 1/(4B).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from checks import counted, recorded
from comm_counter import CommCounter
from dist_utils import Run, read_metrics, spawn, train_named
from meshtrain.accounting import CommStats
from meshtrain.compression.comm import CompressedAllReduce
from meshtrain.config import ConfigError, OptimizerConfig, load_config
from meshtrain.optim import AdamW

# Only what the spawned ranks need is imported at the top: each of them imports this module again.

N, B = 1001, 64  # padded to 1024 on 2 ranks: a chunk of 8 blocks each
ROUNDS = 3
STEPS, FREEZE = 8, 3
SHORT = 6  # the 4-rank layouts: three compressed steps are enough, and each costs twice a 2-rank one
# Psi = 105210 (as in test_zero_equivalence.py): padded on 2 ranks (to 106496), and per stage under pp
TRAIN_BLOCK = 2048  # compression.comm.BLOCK
MODEL = ["model.dim=42", "model.n_heads=3", "model.n_kv_heads=1", "model.n_layers=4"]
BASE = [f"training.steps={STEPS}", "training.lr_schedule=constant", *MODEL]
ONEBIT = ["optimizer.name=onebit_adam", f"optimizer.freeze_step={FREEZE}"]


def padded(n: int, world: int, block: int) -> int:
    return -(-n // (world * block)) * world * block


def expected_bytes(n: int, world: int, block: int) -> dict[str, float]:
    p = padded(n, world, block)
    each = p / 8 + 4 * p / block  # signs and scales, each way
    return {"all_to_all": each, "all_gather": each, "wire": (world - 1) / world * 2 * each}


# ---- the simulation: every rank's rounds in one process, from the method's definition ------------
def _one_bit(x: torch.Tensor) -> torch.Tensor:
    """Per block b of B elements: sign(b) (sign(0) = +1) times |b|_2 / sqrt(B)."""
    rows = x.view(-1, B)
    scales = rows.norm(dim=1) / torch.tensor(float(B)).sqrt()
    return (torch.where(rows >= 0, 1.0, -1.0) * scales[:, None]).reshape(-1)


def simulate(rounds: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """rounds[t][r]: rank r's padded input in round t; returns each round's result (every rank's)."""
    world, size = len(rounds[0]), rounds[0][0].numel()
    chunk = size // world
    worker_err = [torch.zeros(size) for _ in range(world)]
    server_err = [torch.zeros(chunk) for _ in range(world)]
    results = []
    for inputs in rounds:
        sent = []
        for r in range(world):
            x = inputs[r] + worker_err[r]
            sent.append(_one_bit(x))
            worker_err[r] = x - sent[r]
        pieces = []
        for s in range(world):  # server s owns elements [s*chunk, (s+1)*chunk)
            total = sent[0][s * chunk : (s + 1) * chunk]
            for r in range(1, world):
                total = total + sent[r][s * chunk : (s + 1) * chunk]
            y = total / world + server_err[s]
            pieces.append(_one_bit(y))
            server_err[s] = y - pieces[s]
        results.append(torch.cat(pieces))
    return results


def _inputs(world: int) -> list[list[torch.Tensor]]:
    out = []
    for t in range(ROUNDS):
        row = []
        for r in range(world):
            x = torch.randn(N, generator=torch.Generator().manual_seed(100 * t + r))
            row.append(torch.nn.functional.pad(x, (0, padded(N, world, B) - N)))
        out.append(row)
    return out


def _allreduce_worker(rank: int, world: int) -> None:
    inputs, stats = _inputs(world), CommStats()
    reduce = CompressedAllReduce(N, dist.group.WORLD, stats, block=B)
    counter = CommCounter().install()
    try:
        got = [reduce(row[rank]) for row in inputs]
    finally:
        counter.uninstall()
    for t, want in enumerate(simulate(inputs)):
        assert torch.equal(got[t], want), (rank, t, (got[t] - want).abs().max())
    # the error feedback does its job: the mean over rounds is closer than one round's
    exact = [torch.stack(row).mean(0) for row in inputs]
    assert (sum(got) - sum(exact)).norm() < ROUNDS * (got[0] - exact[0]).norm()
    want = expected_bytes(N, world, B)
    for kind in ("all_to_all", "all_gather"):
        assert stats.payload[kind] == counter.bytes[kind] == ROUNDS * want[kind], kind
    assert stats.wire == pytest.approx(ROUNDS * want["wire"])
    assert set(counter.bytes) == {"all_to_all", "all_gather"}


@pytest.mark.dist
def test_compressed_allreduce_equals_the_simulation_bit_for_bit_and_counts_its_bytes() -> None:
    spawn(_allreduce_worker, 2)


# ---- training ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, list[dict]]]:
    tmp = tmp_path_factory.mktemp("onebit")
    dp2, short = ["training.micro_batch=4"], [f"training.steps={SHORT}"]
    resumed = tmp / "resumed"
    specs = {
        "adamw": Run(tmp / "adamw", 2, [*BASE, *dp2, f"checkpoint.interval={STEPS}"]),
        "dp2": Run(tmp / "dp2", 2, [*BASE, *dp2, *ONEBIT]),
        # both with 2 micro-steps per step
        "pp2-dp2": Run(tmp / "pp2", 4, [*BASE, *ONEBIT, "parallel.pp=2", "training.micro_batch=2", *short]),
        "cp2-dp2": Run(tmp / "cp2", 4, [*BASE, *ONEBIT, "parallel.cp=2", "training.micro_batch=2", *short]),
        # stops after step 5 (past the freeze) with a checkpoint, then goes on to step 8 from it
        "first-half": Run(resumed, 2, [*BASE, *dp2, *ONEBIT, "training.steps=5", "checkpoint.interval=5"]),
        "resumed": Run(resumed, 2, [*BASE, *dp2, *ONEBIT]),
        # AdamW's checkpoint of step 8 goes on as 1-bit Adam (frozen at once: 8 > FREEZE)
        "adamw-then-onebit": Run(tmp / "adamw", 2, [*BASE, *dp2, *ONEBIT, f"training.steps={STEPS + 2}"]),
    }
    return train_named(specs)


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records[:STEPS]]  # "adamw" is continued to STEPS + 2 by 1-bit Adam


@pytest.mark.dist
def test_adamw_until_the_freeze_then_learning_on_every_layout(runs: dict[str, tuple[Run, list[dict]]]) -> None:
    adamw = _losses(runs["adamw"][1])
    dp2 = _losses(runs["dp2"][1])
    # the loss of step FREEZE + 1 is taken before its (first compressed) update
    assert dp2[: FREEZE + 1] == adamw[: FREEZE + 1]
    for name in ("dp2", "pp2-dp2", "cp2-dp2"):
        got = _losses(runs[name][1])
        assert len(got) == (STEPS if name == "dp2" else SHORT)
        assert got[: FREEZE + 1] == pytest.approx(adamw[: FREEZE + 1], rel=1e-5), name
        assert got[-1] < got[FREEZE] - 0.03, (name, got)  # still learning after the freeze
        last = adamw[len(got) - 1]
        assert abs(got[-1] - last) < 0.02 * last, (name, got[-1], last)
        # every rank took the same decisions on the same norm
        norms = {
            tuple(r["grad_norm"] for r in read_metrics(runs[name][0].run_dir, k)) for k in range(runs[name][0].nproc)
        }
        assert len(norms) == 1, name


GROUP = {"dp2": 2, "pp2-dp2": 2, "cp2-dp2": 4}  # each layout's data-parallel (x cp) group


@pytest.mark.dist
@pytest.mark.parametrize("name", list(GROUP))
def test_bytes_after_the_freeze_follow_the_formula(runs: dict[str, tuple[Run, list[dict]]], name: str) -> None:
    run, world = runs[name][0], GROUP[name]
    for rank in range(run.nproc):
        records = read_metrics(run.run_dir, rank)
        n = int(records[0]["comm_all_reduce_bytes"]) // 4  # the fp32 gradient all-reduce before the freeze
        want, p = expected_bytes(n, world, TRAIN_BLOCK), padded(n, world, TRAIN_BLOCK)
        for rec in records[FREEZE:]:
            assert rec["comm_all_reduce_bytes"] == 0, (rank, rec["step"])
            assert rec["comm_all_to_all_bytes"] == want["all_to_all"], (rank, rec["step"])
            assert rec["comm_all_gather_bytes"] == want["all_gather"], (rank, rec["step"])
            # the pipeline's activations and the ring's keys and values travel point to point
            assert rec["comm_wire_bytes"] == round(want["wire"] + rec["comm_p2p_bytes"]), (rank, rec["step"])
        fp32_wire = 2 * (world - 1) / world * 4 * n
        ratio = (want["wire"]) / fp32_wire  # 1/32, plus the scales (1/64 of that) and the padding
        assert ratio == pytest.approx(p / n * (1 / 32 + 1 / TRAIN_BLOCK)) and ratio < 1 / 30
        seen, after = counted(run, rank), len(records) - FREEZE
        assert seen.get("all_reduce", 0) == recorded(run, rank, "comm_all_reduce_bytes") == FREEZE * 4 * n
        for kind in ("all_to_all", "all_gather"):
            assert seen[kind] == recorded(run, rank, f"comm_{kind}_bytes") == after * want[kind], (rank, kind)
        if name == "dp2":
            assert p != n  # the case needs padding


@pytest.mark.dist
def test_a_resume_past_the_freeze_resets_the_errors_and_trains_on(runs: dict[str, tuple[Run, list[dict]]]) -> None:
    whole = _losses(runs["dp2"][1])
    resumed = _losses(runs["resumed"][1])
    assert len(resumed) == STEPS
    # up to the checkpoint's weights the runs are one; after it the errors start again from zero,
    # which costs this very early freeze (step 3 of 8) a visible bump, and training goes on
    assert resumed[:6] == whole[:6]
    assert resumed[6:] != whole[6:]
    assert resumed[-1] < resumed[5] and resumed[-1] == pytest.approx(whole[-1], rel=0.03)


# ---- refusals, before anything is spawned ----------------------------------------------------------
REFUSED = [
    (["parallel.zero_stage=1"], 2, "optimizer.name=onebit_adam with parallel.zero_stage=1 is not supported"),
    (["parallel.tp=2"], 2, "optimizer.name=onebit_adam with parallel.tp=2 is not supported"),
    (["model.n_experts=4", "parallel.ep=2"], 2, "optimizer.name=onebit_adam with parallel.ep=2 is not supported"),
    ([], 1, "optimizer.name=onebit_adam needs data parallelism"),
    (["optimizer.freeze_step=0"], 2, "optimizer.freeze_step=0 must be in 1 .. training.steps-1 = 4"),
    (["optimizer.freeze_step=5"], 2, "optimizer.freeze_step=5 must be in 1 .. training.steps-1 = 4"),
]
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"


@pytest.mark.pure
@pytest.mark.parametrize(
    ("overrides", "world", "fragment"), REFUSED, ids=["zero", "tp", "ep", "no-dp", "freeze-0", "freeze-end"]
)
def test_what_onebit_adam_does_not_compose_with_is_refused(overrides: list[str], world: int, fragment: str) -> None:
    from meshtrain.validate import validate

    cfg = load_config(TINY, ["optimizer.name=onebit_adam", "optimizer.freeze_step=2", *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.pure
def test_freeze_step_needs_onebit_adam_and_the_layouts_it_composes_with_validate() -> None:
    from meshtrain.validate import validate

    with pytest.raises(ConfigError, match="optimizer.freeze_step=3 has no effect with optimizer.name='adamw'"):
        validate(load_config(TINY, ["optimizer.freeze_step=3"]), 2)
    for overrides, world in ((["parallel.pp=2"], 4), (["parallel.cp=2"], 4), ([], 2)):
        validate(load_config(TINY, [*ONEBIT, "training.steps=5", *overrides]), world)


class _Exact(CompressedAllReduce):
    """An all-reduce over `world` ranks that all hold the same momentum: the mean is exact."""

    def __init__(self, numel: int, world: int) -> None:  # no process group: nothing is sent
        self.world, self.padded = world, padded(numel, world, TRAIN_BLOCK)
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.clone()

    def errors(self) -> list[torch.Tensor]:
        return []


@pytest.mark.pure
def test_the_optimizer_is_adamw_until_the_freeze_then_adam_with_a_frozen_variance() -> None:
    """Pure: with an exact momentum average, the frozen steps follow the formulas written here."""
    from meshtrain.compression.onebit_adam import FreezeClock, OneBitAdam

    cfg, lr, world, freeze = OptimizerConfig(weight_decay=0.1), 1e-2, 2, 2
    gen = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(3, 5, generator=gen), torch.randn(7, generator=gen)
    grads = [[torch.randn(3, 5, generator=gen), torch.randn(7, generator=gen)] for _ in range(5)]
    ours = [w0.clone(), b0.clone()]
    ref = [w0.clone(), b0.clone()]
    reduce = _Exact(22, world)
    onebit = OneBitAdam([("w", ours[0]), ("b", ours[1])], cfg, {"b"}, FreezeClock(freeze), reduce)
    adamw = AdamW([("w", ref[0]), ("b", ref[1])], cfg, no_decay={"b"})
    for g in grads[:freeze]:
        onebit.step(g, lr)
        adamw.step(g, lr)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref)) and reduce.calls == 0
    m = [t.clone() for t in adamw.exp_avg]
    v = [t.clone() for t in adamw.exp_avg_sq]
    for t, g in enumerate(grads[freeze:], freeze + 1):
        onebit.step([x / world for x in g], lr)  # each rank's share of the global gradient
        for i, (p, grad) in enumerate(zip(ref, g)):
            if i == 0:
                p.mul_(1 - lr * cfg.weight_decay)
            m[i] = cfg.beta1 * m[i] + (1 - cfg.beta1) * grad
            v_hat = v[i] / (1 - cfg.beta2**freeze)  # frozen, with the bias correction of the freeze
            p.sub_(lr * m[i] / (1 - cfg.beta1**t) / (v_hat.sqrt() + cfg.eps))
    assert reduce.calls == len(grads) - freeze
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ours, ref))
    assert torch.equal(onebit.exp_avg_sq[0], v[0])
    assert onebit.state_dict().keys() == adamw.state_dict().keys()  # checkpoints interchangeable
    assert onebit.flat.numel() == 2 * TRAIN_BLOCK and onebit.flat[22:].eq(0).all()  # the padding stays zero


@pytest.mark.dist
def test_an_adamw_checkpoint_goes_on_as_onebit_adam(runs: dict[str, tuple[Run, list[dict]]]) -> None:
    records = runs["adamw-then-onebit"][1]
    assert [r["step"] for r in records] == list(range(1, STEPS + 3))
    assert records[STEPS]["comm_all_reduce_bytes"] == 0 and records[STEPS]["comm_all_to_all_bytes"] > 0
    assert records[-1]["loss"] < records[STEPS - 1]["loss"]
