"""LLM.int8() inference (meshtrain.model.int8): the int8 linear against a quantization written out here,
both matmul paths, injected outlier features (plain absmax int8 degrades, LLM.int8 does not), the
perplexity of a small model trained in-process, the weights' bytes, and `--quantize` on generate."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from meshtrain import cli
from meshtrain.config import ConfigError, ModelConfig
from meshtrain.data.dataset import PackedDataset, held_out, synthetic_tokens
from meshtrain.data.tokenizer import build_tokenizer
from meshtrain.generate import Sampling, generate
from meshtrain.model import Llama, build_model
from meshtrain.model import int8 as q8

pytestmark = [pytest.mark.pure, pytest.mark.usefixtures("one_thread")]
SMALL = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)
SEQ = 32
PROJECTIONS = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
"""One block's linear layers, in the model's order: what quantize_model converts."""
OUTLIERS = (3, 20, 41)
"""The features made outliers in the model test."""


def oracle(x: torch.Tensor, w: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8 written out in float64: outlier columns (any |x| >= threshold) times the dequantized
    weight columns, plus the rest quantized per row of x and per output row of w, multiplied in int64."""
    x, w = x.double(), w.double()
    cols = (x.abs() >= threshold).any(0) if threshold > 0 else torch.zeros(x.shape[1], dtype=torch.bool)
    rest = torch.where(cols, 0.0, x)
    sx = rest.abs().amax(1, keepdim=True) / 127
    sw = w.abs().amax(1, keepdim=True) / 127
    xq = torch.round(rest / torch.where(sx > 0, sx, 1)).long()
    wq = torch.round(w / sw).long()
    w_deq = wq.double() * sw
    return (xq @ wq.T).double() * sx * sw.T + x[:, cols] @ w_deq[:, cols].T


def linear(n_in: int, n_out: int, gen: torch.Generator, bias: bool = False) -> torch.nn.Linear:
    """A linear layer with weights from `gen` (nn.Linear's own init draws from the global generator)."""
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) / n_in**0.5)
        if lin.bias is not None:
            lin.bias.copy_(torch.randn(n_out, generator=gen) * 0.1)
    return lin


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("threshold", [6.0, 0.0], ids=["llm-int8", "absmax"])
def test_int8_linear_equals_the_written_out_quantization(threshold: float) -> None:
    gen = torch.Generator().manual_seed(0)
    lin = linear(40, 24, gen, bias=True)
    x = torch.randn(2, 7, 40, generator=gen)
    x[0, 3, 5], x[1, 0, 17] = 9.0, -7.5  # two outlier columns (5 and 17); a zero row quantizes to zeros
    x[1, 6] = 0.0
    layer = q8.Int8Linear.from_linear(lin, threshold)
    want = oracle(x.reshape(-1, 40), lin.weight.detach(), threshold) + lin.bias.detach().double()
    got = layer(x)
    assert got.shape == (2, 7, 24) and got.dtype == torch.float32
    torch.testing.assert_close(got.reshape(-1, 24).double(), want, rtol=1e-5, atol=1e-5)
    assert layer.paths == {q8.INT_MM: 1}  # torch 2.13's CPU _int_mm takes every 2-D int8 pair


def test_the_float_fallback_is_exact_where_int_mm_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (5, 3000), dtype=torch.int8, generator=gen)  # K past fp32's exact range
    b = torch.full((4, 3000), 127, dtype=torch.int8)
    exact = a.long() @ b.long().T
    c, path = q8.int8_matmul(a, b)
    assert path == q8.INT_MM and torch.equal(c.long(), exact)

    def refuse(*_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("_int_mm: not on this device")

    monkeypatch.setattr(torch, "_int_mm", refuse)
    for k in (40, 3000):  # fp32 below 2^24 / 127^2, float64 above
        c, path = q8.int8_matmul(a[:, :k], b[:, :k])
        assert path == q8.FLOAT_MM and torch.equal(c.long(), a[:, :k].long() @ b[:, :k].long().T), k
    lin = linear(40, 24, gen)
    x = torch.randn(3, 40, generator=gen) * 3
    for layer in (q8.Int8Linear.from_linear(lin, 6.0), q8.Int8Linear.from_linear(lin, 6.0, int_mm=False)):
        torch.testing.assert_close(layer(x).double(), oracle(x, lin.weight.detach(), 6.0), rtol=1e-5, atol=1e-5)
        assert layer.paths == {q8.FLOAT_MM: 1}


def test_injected_outlier_features_hurt_absmax_but_not_llm_int8() -> None:
    """Three input features 40x larger in every row, as trained transformers grow them: one of them
    sets each row's absmax scale, so plain int8 rounds the other features to a few levels."""
    gen = torch.Generator().manual_seed(2)
    lin = linear(256, 128, gen)
    x = torch.randn(64, 256, generator=gen)
    plain = {t: rel_err(q8.Int8Linear.from_linear(lin, t)(x), lin(x)) for t in (6.0, 0.0)}
    x[:, [5, 77, 200]] *= 40
    ref = lin(x)
    err = {t: rel_err(q8.Int8Linear.from_linear(lin, t)(x), ref) for t in (6.0, 0.0)}
    assert plain[0.0] == plain[6.0] < 0.01  # no |x| >= 6 without the injection: the same product
    assert err[0.0] > 3 * err[6.0] and err[6.0] <= plain[6.0], (plain, err)  # measured: 3.1% against 0.7%


def batches(data: PackedDataset, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(data) - size + 1, size):
        yield data.batch(torch.arange(start, start + size).numpy())


@pytest.fixture(scope="module")
def trained() -> tuple[Llama, PackedDataset]:
    """A small Llama trained in-process for 40 steps on the synthetic Markov chain, and its held-out split."""
    tokens = synthetic_tokens(SMALL.vocab_size, 24_000, seed=0)
    train, val = (held_out(tokens, SEQ, 0.05, split) for split in ("train", "val"))
    model = build_model(SMALL, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        x, y = train.batch(torch.randint(0, len(train), (16,), generator=gen).numpy())
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), val


@torch.no_grad()
def perplexity(model: torch.nn.Module, val: PackedDataset) -> float:
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum") for x, y in batches(val, 8)]
    return float(torch.exp(torch.stack(losses).sum() / (len(losses) * 8 * SEQ)))


def quantized(model: Llama, mode: str) -> tuple[Llama, q8.QuantizeReport]:
    copied = copy.deepcopy(model)
    return copied, q8.quantize_model(copied, mode)


def test_llm_int8_perplexity_is_within_one_percent_of_fp32(trained: tuple[Llama, PackedDataset]) -> None:
    model, val = trained
    ppl = {"none": perplexity(model, val)}
    for mode in ("absmax", "int8"):
        ppl[mode] = perplexity(quantized(model, mode)[0], val)
    print(f"perplexity of the in-process model: {ppl}")
    assert ppl["none"] < 0.5 * SMALL.vocab_size  # it learned something: uniform guessing is 256
    assert abs(ppl["int8"] / ppl["none"] - 1) < 0.01, ppl
    assert abs(ppl["absmax"] / ppl["none"] - 1) < 0.05, ppl  # reported beside it; no outliers to hurt it here


def test_outlier_features_in_the_model_hurt_absmax_but_not_llm_int8(trained: tuple[Llama, PackedDataset]) -> None:
    """Three features of every block's normalised inputs made 60x larger, the projections that read
    them 60x smaller: the same function in fp32, but with outlier features in the int8 layers' inputs."""
    model, val = copy.deepcopy(trained[0]), trained[1]
    with torch.no_grad():
        for block in model.model.layers.values():
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[list(OUTLIERS)] *= 60
            for lin in (
                *(getattr(block.self_attn, f"{p}_proj") for p in "qkv"),
                block.mlp.gate_proj,
                block.mlp.up_proj,
            ):
                lin.weight[:, list(OUTLIERS)] /= 60
    tokens, _ = next(batches(val, 8))
    with torch.no_grad():
        want = model(tokens)
        err = {mode: rel_err(quantized(model, mode)[0](tokens), want) for mode in ("absmax", "int8")}
    ppl = {"none": perplexity(model, val), **{m: perplexity(quantized(model, m)[0], val) for m in ("absmax", "int8")}}
    print(f"with injected outlier features: perplexity {ppl}, logits' relative error {err}")
    assert ppl["none"] == pytest.approx(perplexity(trained[0], val), rel=1e-4)  # the same function
    gap = {m: ppl[m] / ppl["none"] - 1 for m in ("absmax", "int8")}
    assert abs(gap["int8"]) < 0.002 and gap["absmax"] > max(0.003, 4 * abs(gap["int8"])), ppl
    assert err["absmax"] > 2 * err["int8"], err


def test_quantize_model_swaps_the_linears_and_counts_their_bytes() -> None:
    cfg = ModelConfig(**{**SMALL.__dict__, "tie_embeddings": True})
    model = build_model(cfg, seed=0)
    report = q8.quantize_model(model, "int8")
    linears = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS]
    assert report.converted == linears and report.kept == ["lm_head"]
    assert all(isinstance(model.get_submodule(n), q8.Int8Linear) for n in linears)
    assert model.lm_head is not None and model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    d, h, kv = cfg.dim, cfg.hidden_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (h, d), (h, d), (d, h)]  # (out, in) of one block's linears
    linear_params = 2 * sum(o * i for o, i in shapes)
    other = cfg.vocab_size * d + 2 * 2 * d + d  # the tied embedding, four block norms, the final norm
    assert report.fp32_bytes == 4 * (linear_params + other) and report.bf16_bytes == report.fp32_bytes // 2
    assert report.quantized_bytes == linear_params + 2 * 4 * sum(o for o, _ in shapes) + 4 * other


def test_a_moe_model_keeps_its_routed_experts_and_still_runs() -> None:
    cfg = ModelConfig(**{**SMALL.__dict__, "n_experts": 4, "top_k": 2, "expert_ffn_dim": 32, "n_shared_experts": 1})
    model = build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)
    report = q8.quantize_model(model, "int8")
    assert any(".mlp.experts.0." in n for n in report.kept) and any("shared_experts" in n for n in report.converted)
    with torch.no_grad():
        assert rel_err(model(tokens), want) < 0.02


def test_bad_modes_and_thresholds_are_config_errors() -> None:
    model = build_model(SMALL, seed=0)
    with pytest.raises(ConfigError, match="one of int8, absmax"):
        q8.quantize_model(model, "int4")
    with pytest.raises(ConfigError, match="must be > 0"):
        q8.quantize_model(model, "int8", threshold=0.0)
    assert q8.apply_quantize(model, "none") is None and isinstance(model.lm_head, torch.nn.Linear)


def test_cli_generate_quantized_says_which_path_ran(
    trained: tuple[Llama, PackedDataset], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = build_tokenizer("byte")
    monkeypatch.setattr("meshtrain.generate.load_for_generation", lambda run_dir: (copy.deepcopy(trained[0]), tok, 40))
    argv = ["generate", "--run-dir", "x", "--prompt", "ab", "--max-new-tokens", "10", "--temperature", "0"]
    assert cli.main([*argv, "--quantize", "int8"]) == 0
    out, err = capsys.readouterr()
    model = quantized(trained[0], "int8")[0]
    assert out == generate(model, tok, "ab", 10, torch.device("cpu"), Sampling(temperature=0)).text + "\n"
    assert f"LLM.int8 (threshold 6): {2 * len(PROJECTIONS)} linears int8, 1 kept (lm_head) | outlier columns" in err
    expected_path = q8.INT_MM if q8.fast_int_mm(torch.device("cpu")) else q8.FLOAT_MM  # the default's rule
    assert f"matmul: {expected_path} (" in err and "MiB int8 model" in err
    with pytest.raises(SystemExit):  # argparse's choices
        cli.main([*argv, "--quantize", "int4"])
