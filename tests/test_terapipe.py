"""TeraPipe's token slices without processes: the schedule passes the validator and the deadlock
checker, which know the slices' order on a stage (an order that breaks it is refused); the simulator
against the fill-and-drain formula, written here; the bubble against microbatch pipelining at one
or two sequences; attention over kept keys and values against the whole sequence's (forward and
backward); and the configurations it cannot run refused in one line.

The runs through the executor on 2 and 4 stages are in test_pipeline_gloo.py, a trained run in
test_pipeline_equivalence.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import config_error
from meshtrain.config import ModelConfig
from meshtrain.loss import cross_entropy_sum
from meshtrain.model import build_model
from meshtrain.model.kv_cache import SliceKV
from meshtrain.pipeline.schedules import SCHEDULES, Action, Kind, Layout, ScheduleError, add_comms, terapipe
from meshtrain.tools.schedule_check import check_deadlock, validate_schedule
from meshtrain.tools.simulator import Costs, closed_form, simulate

pytestmark = [pytest.mark.pure, pytest.mark.usefixtures("one_thread")]
GRID = [(p, m, s) for p in (2, 3, 4) for m in (1, 2, 3) for s in (1, 2, 4, 8)]


@pytest.mark.parametrize(("pp", "m", "slices"), GRID)
def test_terapipe_passes_the_validator_and_the_deadlock_checker(pp: int, m: int, slices: int) -> None:
    schedule = terapipe(pp, m, 1, slices)
    validate_schedule(schedule, pp, 1, m * slices, Layout.looped(pp, 1, slices))
    check_deadlock(schedule)


def _compute(pp: int, units: int, forward: list[int], backward: list[int]) -> list[list[Action]]:
    """Every rank: the forwards of `forward`'s units in that order, then the backwards of `backward`'s."""
    return [[Action(Kind.F, r, u) for u in forward] + [Action(Kind.BW, r, u) for u in backward] for r in range(pp)]


@pytest.mark.parametrize(
    ("forward", "backward", "what"),
    [
        ([1, 0, 2, 3], [3, 2, 1, 0], "F(stage=0, mb=1)"),  # slice 1 before the keys of slice 0 exist
        ([0, 1, 2, 3], [0, 1, 2, 3], "BW(stage="),  # slice 0's backward before slice 1 gave its keys a gradient
    ],
)
def test_an_order_against_the_slices_is_refused(forward: list[int], backward: list[int], what: str) -> None:
    """Two sequences of two slices: with the layout's slices the checkers see the order break;
    the same lists over whole microbatches (no slices) are a valid GPipe."""
    compute = _compute(2, 4, forward, backward)
    whole = Layout.looped(2)
    validate_schedule(add_comms(compute, whole), 2, 1, 4, whole)
    with pytest.raises(ScheduleError, match="deadlock|comes before") as info:
        validate_schedule(add_comms(compute, whole), 2, 1, 4, Layout.looped(2, 1, 2))
    assert what in str(info.value)


@pytest.mark.parametrize(("pp", "m", "slices"), GRID)
def test_simulated_makespan_is_fill_and_drain_over_slices(pp: int, m: int, slices: int) -> None:
    """GPipe over m*S units of 1/S a sequence's cost: (m*S + p - 1) units' forwards, then as many
    backwards; the peak holds every unit of every sequence, m sequences' activations."""
    costs = Costs(f=1.0, b=2.0, w=0.0)
    result = simulate(terapipe(pp, m, 1, slices), costs, Layout.looped(pp, 1, slices))
    unit_f, unit_b = costs.f / slices, costs.b / slices
    assert result.makespan == pytest.approx((m * slices + pp - 1) * (unit_f + unit_b))
    assert result.peak_activations == pytest.approx((m,) * pp)
    pred = closed_form("terapipe", pp, m, 1, costs, slices)
    assert result.bubble_time == pytest.approx(pred.bubble_time) and pred.holds


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 2])
def test_slices_shrink_the_bubble_where_microbatches_cannot(pp: int, m: int) -> None:
    """One or two long sequences: 1F1B and GPipe idle (p-1)/(m+p-1) of the time; eight slices cut
    the fill and drain eight times, (p-1)/(8m+p-1)."""
    costs = Costs(f=1.0, b=1.0, w=1.0)
    one_f = simulate(SCHEDULES["1f1b"](pp, m), costs).bubble_rate
    gpipe = simulate(SCHEDULES["gpipe"](pp, m), costs).bubble_rate
    tera = simulate(terapipe(pp, m, 1, 8), costs, Layout.looped(pp, 1, 8)).bubble_rate
    assert one_f == pytest.approx((pp - 1) / (m + pp - 1)) and gpipe == pytest.approx(one_f)
    assert tera == pytest.approx((pp - 1) / (8 * m + pp - 1))
    assert tera < one_f


def _model_and_data() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=24)
    torch.manual_seed(0)
    data = torch.randint(0, 64, (2, 25))
    return build_model(cfg, seed=1), data[:, :-1], data[:, 1:]


@pytest.mark.parametrize("slices", [2, 3, 8])
def test_slices_with_kept_keys_match_the_whole_sequence(slices: int) -> None:
    """Slices run forward in order against the keys and values kept of the earlier ones, backward in
    reverse (each from its loss and its keys and values): the whole sequence's loss, logits and
    every parameter gradient, to float32 rounding."""
    model, tokens, targets = _model_and_data()
    logits = model(tokens)
    loss = cross_entropy_sum(logits, targets)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    width = tokens.shape[1] // slices
    kv = SliceKV(tokens.shape[1])
    cuts = [slice(j * width, (j + 1) * width) for j in range(slices)]
    parts = [model(tokens[:, c], cache=kv) for c in cuts]
    torch.testing.assert_close(torch.cat([p.detach() for p in parts], dim=1), logits.detach())
    losses = [cross_entropy_sum(p, targets[:, c]) for p, c in zip(parts, cuts)]
    assert float(sum(x.detach() for x in losses)) == pytest.approx(float(loss.detach()), rel=1e-6)
    for j in reversed(range(slices)):
        made, grads = kv.pop_slice()
        assert len(made) == (0 if j == slices - 1 else 2 * 2)  # keys and values of both blocks
        torch.autograd.backward([losses[j], *made], [torch.ones(()), *grads])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-6, msg=lambda s: f"{n}: {s}")


BASE = ["parallel.pp=2", "model.n_layers=4", "training.seq_len=64"]


@pytest.mark.parametrize(
    ("world", "overrides", "words"),
    [
        (2, ["parallel.pp_slices=4"], ["parallel.pp_slices=4", "pp_schedule=terapipe"]),
        (1, ["parallel.pp=1", "parallel.pp_slices=4", "training.seq_len=64"], ["parallel.pp_slices=4", "pp=1"]),
        (2, ["parallel.pp_schedule=terapipe", "parallel.pp_slices=5"], ["pp_slices=5", "training.seq_len=64"]),
        (4, ["parallel.pp_schedule=terapipe", "parallel.pp_slices=4", "parallel.cp=2"], ["parallel.cp=2", "cp=1"]),
        (
            4,
            ["parallel.pp_schedule=terapipe", "parallel.pp_slices=4", "parallel.tp=2", "model.n_heads=4"],
            ["parallel.tp=2", "tp=1"],
        ),
        (
            4,
            ["parallel.pp_schedule=terapipe", "parallel.pp_slices=4", "parallel.zero_stage=3"],
            ["zero_stage=3", "zero_stage<=2"],
        ),
        (2, ["parallel.pp_schedule=terapipe", "parallel.pp_slices=4", "model.n_experts=4"], ["model.n_experts=4"]),
        (
            2,
            ["parallel.pp_schedule=terapipe", "parallel.pp_slices=4", "training.activation_checkpointing=full"],
            ["activation_checkpointing='full'", "activation_checkpointing=none"],
        ),
    ],
)
def test_what_terapipe_cannot_run_is_refused_in_one_line(world: int, overrides: list[str], words: list[str]) -> None:
    message = config_error(world, *(BASE if overrides[0] != "parallel.pp=1" else []), *overrides)
    for word in words:
        assert word in message, message


def test_terapipe_configuration_validates() -> None:
    from meshtrain.config import load_config
    from meshtrain.validate import validate

    cfg = validate(load_config(None, [*BASE, "parallel.pp_schedule=terapipe", "parallel.pp_slices=4"]), 4)
    assert (cfg.parallel.pp_slices, cfg.parallel.dp_shard) == (4, 2)
