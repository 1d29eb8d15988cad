"""The mixture-of-experts layer against references written here: a per-token loop for the routing,
the experts and their gradients; a per-sequence count for capacity; the balancing losses' formulas.
All in fp64 on one process."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from meshtrain.activation_checkpoint import apply_activation_checkpointing
from meshtrain.config import ModelConfig
from meshtrain.model import build_model, count_params
from meshtrain.model.math import from_model_config, param_count
from meshtrain.model.moe import MoE, capacity_mask, combine
from meshtrain.tools import moe_plot

pytestmark = pytest.mark.pure
CFG = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, n_experts=4, top_k=2, expert_ffn_dim=8, vocab_size=64)


def _layer(**overrides: object) -> MoE:
    cfg = dataclasses.replace(CFG, **overrides)
    torch.manual_seed(0)
    layer = MoE(cfg).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def _swiglu(expert: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    g, u, d = expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight
    return (F.silu(x @ g.T) * (x @ u.T)) @ d.T


def _loop(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: scores, the top-k by scores + bias, weights renormalised, capacity by
    first come within each sequence, the chosen experts' SwiGLU summed, plus the shared experts."""
    cfg = layer.cfg
    b, s, _ = x.shape
    cap = math.ceil(s * cfg.top_k / cfg.n_experts * cfg.capacity_factor) if cfg.capacity_factor else None
    rows = []
    for i in range(b):
        taken = [0] * cfg.n_experts
        for t in range(s):
            tok = x[i, t]
            logits = layer.gate.weight @ tok
            scores = logits.softmax(-1) if cfg.router_score == "softmax" else logits.sigmoid()
            bias = layer.gate.e_score_correction_bias if cfg.load_balance == "bias" else 0.0
            chosen = torch.topk(scores.detach() + bias, cfg.top_k).indices.tolist()
            total = sum(scores[j] for j in chosen)
            out = torch.zeros_like(tok)
            for j in chosen:
                taken[j] += 1
                if cap is None or taken[j] <= cap:
                    out = out + scores[j] / total * _swiglu(layer.experts[str(j)], tok)
            if layer.shared_experts is not None:
                out = out + _swiglu(layer.shared_experts, tok)
            rows.append(out)
    return torch.stack(rows).view_as(x)


CASES = {
    "softmax": {},
    "sigmoid": {"router_score": "sigmoid"},
    "shared": {"n_shared_experts": 2},
    "capacity": {"capacity_factor": 0.5},
    "bias": {"load_balance": "bias"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_layer_equals_a_per_token_loop_forward_and_backward(case: str) -> None:
    layer = _layer(
        load_balance="none" if case != "bias" else "bias",
        **{k: v for k, v in CASES[case].items() if k != "load_balance"},
    )
    if case == "bias":  # a bias large enough to change the choice, which must not change the weights
        layer.gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.5, -0.5, 0.2]))
    x = torch.randn(3, 6, CFG.dim, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 6, CFG.dim, dtype=torch.float64)
    ours = layer(x)
    (ours * grad).sum().backward()
    got = [x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
    x.grad = None
    layer.zero_grad()
    want = _loop(layer, x)
    (want * grad).sum().backward()
    torch.testing.assert_close(ours, want)
    for g, w in zip(
        got, [x.grad, *(p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.parameters())]
    ):
        torch.testing.assert_close(g, w)


def test_dispatch_then_combine_with_weights_one_over_k_restores_the_input() -> None:
    """Identity experts, weights 1/top_k: the input and its gradient come back, with experts 1
    and 3 given no token at all."""
    x = torch.randn(10, CFG.dim, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 2]] * 10)
    weights = torch.full((10, 2), 0.5, dtype=torch.float64)
    keep = torch.ones(10, 2, dtype=torch.bool)
    seen = []

    def identity(rows: torch.Tensor, counts: torch.Tensor, experts: object) -> torch.Tensor:
        seen.append(counts.tolist())
        return rows

    out = combine(x, idx, weights, keep, torch.nn.ModuleDict(), identity, 4)
    torch.testing.assert_close(out, x)
    g = torch.randn_like(x)
    out.backward(g)
    torch.testing.assert_close(x.grad, g)
    assert seen == [[10, 0, 10, 0]]


def test_grouped_matmuls_equal_the_loop_and_handle_empty_experts() -> None:
    """The grouped path (aligned shapes) and the per-expert loop (unaligned) agree, with an expert
    that receives nothing."""
    for width in (8, 6):  # 8 fp32 elements are 32 bytes (grouped); 6 are 24 (the loop)
        layer = _layer(expert_ffn_dim=width).float()
        x = torch.randn(12, CFG.dim)
        counts = torch.tensor([5, 0, 4, 3])
        ours = layer.dispatch(x, counts, layer.experts)
        want = torch.cat([_swiglu(layer.experts[str(j)], part) for j, part in enumerate(x.split(counts.tolist()))])
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_capacity_keeps_the_first_tokens_of_each_sequence_per_expert() -> None:
    torch.manual_seed(3)
    idx = torch.randint(0, 4, (2 * 8, 2))
    keep = capacity_mask(idx, 8, 4, 0.75)  # cap = ceil(8*2/4*0.75) = 3 per expert and sequence
    for seq in range(2):
        taken: dict[int, int] = {}
        for t in range(seq * 8, seq * 8 + 8):
            for slot in range(2):
                e = int(idx[t, slot])
                taken[e] = taken.get(e, 0) + 1
                assert bool(keep[t, slot]) == (taken[e] <= 3)


def test_balancing_losses_have_their_formulas_and_their_gradients() -> None:
    """aux = coef * E * sum_i f_i P_i per sequence (f: share of the sequence's assignments, P: mean
    normalised score), z = coef * logsumexp(logits)^2 per token, both scaled as set; the layer's
    backward adds their gradient to the router's."""
    layer = _layer(aux_loss_coef=0.1, z_loss_coef=0.01)
    layer.loss_scale.per_sequence, layer.loss_scale.per_token = 0.25, 1 / 12
    x = torch.randn(2, 6, CFG.dim, dtype=torch.float64)
    w = layer.gate.weight.detach().clone().requires_grad_()
    logits = x.reshape(-1, CFG.dim) @ w.T
    probs = logits.softmax(-1)
    chosen = probs.detach().topk(2, -1).indices.view(2, 12)
    f = torch.stack([torch.bincount(c, minlength=4) for c in chosen]).double() / 12
    p = probs.view(2, 6, 4).mean(1)
    aux = 0.1 * 4 * (f * p).sum() * 0.25
    z = 0.01 * logits.logsumexp(-1).pow(2).sum() / 12
    (aux + z).backward()
    layer(x).sum().backward()
    assert layer.stats.aux_loss == pytest.approx(float(aux.detach())) and layer.stats.z_loss == pytest.approx(
        float(z.detach())
    )
    plain = _layer(load_balance="none")
    plain.load_state_dict(layer.state_dict())
    plain(x).sum().backward()
    torch.testing.assert_close(layer.gate.weight.grad, plain.gate.weight.grad + w.grad)


def test_an_auxiliary_loss_split_over_sequence_parts_adds_up_to_the_whole() -> None:
    """Context parallelism's rule: two halves of each sequence, each told the whole sequence's
    counts through `sequence_sum` (here the other half's counts, added by hand), give auxiliary
    losses and router gradients that add up to those of the whole sequences."""
    x = torch.randn(2, 8, CFG.dim, dtype=torch.float64)
    whole = _layer(aux_loss_coef=0.1, z_loss_coef=0.01)
    whole(x).sum().backward()
    halves = [x[:, :4], x[:, 4:]]

    def counts(layer: MoE, part: torch.Tensor) -> torch.Tensor:
        idx = layer.route(part.reshape(-1, CFG.dim))[0]
        return F.one_hot(idx.view(2, -1), 4).sum(1).double()

    split = _layer(aux_loss_coef=0.1, z_loss_coef=0.01)
    other = [counts(split, halves[1]), counts(split, halves[0])]
    for part, rest in zip(halves, other):
        split.sequence_sum = lambda c, rest=rest: c + rest
        split(part).sum().backward()
    assert split.stats.aux_loss == pytest.approx(whole.stats.aux_loss) and split.stats.z_loss == pytest.approx(
        whole.stats.z_loss
    )
    torch.testing.assert_close(split.gate.weight.grad, whole.gate.weight.grad)
    # a half on its own (no sequence_sum) has another loss: the rule is what makes them agree
    alone = _layer(aux_loss_coef=0.1, z_loss_coef=0.01)
    for part in halves:
        alone(part).sum().backward()
    assert alone.stats.aux_loss != pytest.approx(whole.stats.aux_loss)


def test_recomputed_forwards_are_not_counted_twice() -> None:
    cfg = dataclasses.replace(CFG, max_seq_len=16)
    counts = []
    tokens = torch.randint(0, 64, (2, 16))
    for mode in ("none", "full"):
        model = build_model(cfg, seed=1)
        apply_activation_checkpointing(model.model.layers, mode, 1)
        model(tokens).float().sum().backward()
        counts.append([m.mlp.stats.counts.clone() for m in model.model.layers.values()])
    for a, b in zip(*counts):
        torch.testing.assert_close(a, b)
        assert float(a.sum()) == 2 * 16 * 2


def test_names_follow_deepseek_v3_and_the_count_matches_the_arithmetic() -> None:
    cfg = dataclasses.replace(CFG, n_layers=3, first_dense_layers=1, n_shared_experts=1)
    model = build_model(cfg)
    names = {n for n, _ in model.named_parameters()} | set(dict(model.named_buffers()))
    assert "model.layers.0.mlp.gate_proj.weight" in names  # the first block stays dense
    for want in (
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.2.mlp.experts.3.down_proj.weight",
        "model.layers.2.mlp.shared_experts.up_proj.weight",
    ):
        assert want in names
    assert count_params(cfg) == param_count(from_model_config(cfg))


def test_the_load_plot_reads_shares_from_the_metrics(tmp_path: Path) -> None:
    records = [
        {"step": 1, "moe_expert_load": {"model.layers.0.mlp": [2, 2, 0, 4]}},
        {"step": 2, "moe_expert_load": {"model.layers.0.mlp": [1, 1, 1, 1]}},
    ]
    assert moe_plot.load_shares(records) == {"model.layers.0.mlp": [[0.25, 0.25, 0.0, 0.5], [0.25] * 4]}
    moe_plot.draw(records, tmp_path / "load.png")
    assert (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"
