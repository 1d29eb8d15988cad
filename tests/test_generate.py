"""Generation: the KV cache against full-window forwards, sampling filters against independent ones,
and the ways a generation ends (length, end-of-text token, stop text)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from meshtrain import cli
from meshtrain.config import ModelConfig
from meshtrain.data.tokenizer import JsonTokenizer
from meshtrain.generate import CachedLogits, Sampling, filter_logits, generate, next_token
from meshtrain.model import Llama, build_model
from meshtrain.model.kv_cache import KVCache

pytestmark = [pytest.mark.pure, pytest.mark.usefixtures("one_thread")]
CPU = torch.device("cpu")
TINY = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 16, "max_seq_len": 32, "init_std": 0.1}
CONFIGS = {
    "gqa": ModelConfig(**TINY),
    "moe": ModelConfig(**TINY, n_experts=4, top_k=2, expert_ffn_dim=32),
    "tied": ModelConfig(**{**TINY, "n_kv_heads": 4}, tie_embeddings=True),
}


class Letters:
    """Token i is the letter chr(97 + i): a 16-token vocabulary whose texts are easy to write down."""

    vocab_size = 16

    def __init__(self, eos_id: int | None = None) -> None:
        self.eos_id = eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.array([ord(c) - 97 for c in text], dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i) for i in ids)


def greedy_reference(model: Llama, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids, each from a full forward over everything so far (no cache)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


@pytest.fixture(scope="module")
def model() -> Llama:
    """Seed 2: its greedy continuation of "ab" varies (many seeds repeat one token), which the
    end-of-text and stop tests need."""
    return build_model(CONFIGS["gqa"], seed=2).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_cached_logits_equal_full_window_logits(name: str) -> None:
    """Prefill 7 tokens, then a block of 3 after the prefix (the bottom-right causal mask), then 4
    single-token decodes: every logit equals the uncached forward over the whole sequence."""
    cfg = CONFIGS[name]
    m = build_model(cfg, seed=1).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 14), generator=torch.Generator().manual_seed(0))
    cache = KVCache(cfg.max_seq_len)
    cuts = [0, 7, 10, 11, 12, 13, 14]
    for a, b in zip(cuts, cuts[1:]):
        got = m(tokens[:, a:b], cache=cache)
        want = m(tokens[:, :b])[:, a:]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert cache.length == 14
    keys = cache.layers["0"].keys
    assert keys is not None and keys.shape == (2, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)


@torch.no_grad()
def test_cache_refuses_what_it_cannot_hold(model: Llama) -> None:
    cache = KVCache(32)
    model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="30 of 32 positions; 3 more"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="positions from the cache"):
        model(torch.zeros(1, 1, dtype=torch.long), positions=torch.tensor([30]), cache=cache)
    with pytest.raises(ValueError, match="pass model.max_seq_len = 32"):
        model(torch.zeros(1, 33, dtype=torch.long), cache=KVCache(40))
    sharded = build_model(CONFIGS["gqa"]).eval()
    sharded.model.layers["1"].self_attn.attention = lambda q, k, v: q  # as context parallelism swaps it
    with pytest.raises(RuntimeError, match="single-device attention core"):
        sharded(torch.zeros(1, 4, dtype=torch.long), cache=KVCache(32))


@torch.no_grad()
def test_cache_refills_its_window_when_full(model: Llama) -> None:
    """Past max_seq_len (32) the decoder keeps generating: each call's logits equal a full forward
    over the context it says it holds, which is the newest tokens, 3/4 of a window to a whole one."""
    ids = torch.randint(0, 16, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    decoder = CachedLogits(model, CPU)
    starts = set()
    for n in range(5, 46):
        got = decoder(ids[:n])
        context = ids[decoder.start : n]
        assert len(context) <= 32 and (n <= 32 or len(context) >= 24)
        torch.testing.assert_close(got, model(torch.tensor([context]))[0, -1], rtol=0, atol=1e-5)
        starts.add(decoder.start)
    assert starts == {0, 9, 18}  # refills at 33 and 42 tokens, each keeping the newest 24


def test_greedy_text_is_the_same_with_and_without_the_cache(model: Llama) -> None:
    tok = Letters()
    want = tok.decode(greedy_reference(model, [1, 2, 3], 20))
    for kv_cache in (True, False):
        out = generate(model, tok, "bcd", 20, CPU, Sampling(temperature=0), kv_cache=kv_cache)
        assert out.text == want and out.new_tokens == 20 and out.stopped == "length"


def test_temperature_zero_takes_the_argmax_whatever_the_filters() -> None:
    gen = torch.Generator().manual_seed(0)
    for i in range(20):
        logits = torch.randn(50, generator=gen)
        sampling = Sampling(temperature=0, top_k=i % 3, top_p=[1.0, 0.5, 0.01][i % 3], seed=i)
        assert next_token(logits, sampling, gen) == int(np.argmax(logits.numpy()))


def nucleus_reference(logits: list[float], p: float) -> set[int]:
    """The fewest most likely tokens whose probabilities sum to at least p, in plain Python."""
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    probs = [w / sum(weights) for w in weights]
    kept: set[int] = set()
    mass = 0.0
    for i in sorted(range(len(probs)), key=lambda j: -probs[j]):
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_top_p_keeps_the_nucleus(p: float) -> None:
    logits = torch.randn(40, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2
    kept = {int(i) for i in torch.nonzero(torch.isfinite(filter_logits(logits, top_p=p)))}
    assert kept == nucleus_reference(logits.tolist(), p)
    # top-k first, then the nucleus of what is left (renormalised)
    best10 = sorted(range(40), key=lambda j: -float(logits[j]))[:10]
    within = nucleus_reference([float(logits[j]) for j in best10], p)
    kept = {int(i) for i in torch.nonzero(torch.isfinite(filter_logits(logits, top_k=10, top_p=p)))}
    assert kept == {best10[j] for j in within}


def test_sampling_draws_inside_the_filters_and_a_seed_reproduces_it() -> None:
    logits = torch.randn(30, generator=torch.Generator().manual_seed(2))
    for temperature in (0.5, 2.0):  # the nucleus is taken of the tempered distribution
        allowed = nucleus_reference([x / temperature for x in logits.tolist()], 0.5)
        gen = torch.Generator().manual_seed(5)
        sampling = Sampling(temperature=temperature, top_k=0, top_p=0.5)
        draws = {next_token(logits, sampling, gen) for _ in range(300)}
        assert draws == allowed  # every draw allowed, and (300 draws) every allowed token drawn


def test_a_seed_reproduces_a_text_and_another_seed_changes_it(model: Llama) -> None:
    def text(seed: int) -> str:
        return generate(model, Letters(), "ab", 30, CPU, Sampling(temperature=1.5, top_k=0, seed=seed)).text

    assert text(1) == text(1) and text(1) != text(2)


def _first_new_token(new: list[int]) -> int:
    """The first index k >= 2 whose token did not occur before it (the test's end marker)."""
    return next(k for k in range(2, len(new)) if new[k] not in new[:k])


def test_end_of_text_token_ends_generation(model: Llama) -> None:
    new = greedy_reference(model, [0, 1], 16)[2:]
    k = _first_new_token(new)
    tok = Letters(eos_id=new[k])
    out = generate(model, tok, "ab", 16, CPU, Sampling(temperature=0))
    assert (out.text, out.new_tokens, out.stopped) == (tok.decode([0, 1, *new[:k]]), k, "eos")


def test_stop_text_ends_generation_and_is_left_out(model: Llama) -> None:
    tok = Letters()
    new = tok.decode(greedy_reference(model, [0, 1], 16)[2:])
    stop = new[3:5]
    out = generate(model, tok, "ab", 16, CPU, Sampling(temperature=0), stop=["zz", stop])
    assert out.text == "ab" + new[: new.find(stop)] and out.stopped == "stop"
    assert out.new_tokens == new.find(stop) + 2


def test_json_tokenizer_finds_its_end_of_text_token(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "</s>": 3}
    spec = {
        "version": "1.0",
        "added_tokens": [{"id": 3, "content": "</s>", "special": True, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False}],
        "pre_tokenizer": {"type": "Whitespace"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert JsonTokenizer(str(tmp_path / "tokenizer.json")).eos_id == 3
    del vocab["</s>"], spec["added_tokens"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert JsonTokenizer(str(tmp_path / "tokenizer.json")).eos_id is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature -1.0"),
        (["--temperature", "nan"], "temperature nan"),
        (["--top-p", "0"], "top-p 0.0"),
        (["--top-p", "1.5"], "top-p 1.5"),
        (["--top-k", "-2"], "top-k -2"),
        (["--max-new-tokens", "-1"], "max-new-tokens -1"),
        (["--stop", ""], "stop text"),
    ],
)
def test_bad_sampling_options_are_one_line_errors(
    args: list[str], message: str, model: Llama, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr("meshtrain.generate.load_for_generation", lambda run_dir: (model, Letters(), 5))
    assert cli.main(["generate", "--run-dir", "x", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_generate_reports_its_speed(
    model: Llama, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr("meshtrain.generate.load_for_generation", lambda run_dir: (model, Letters(), 5))
    new = Letters().decode(greedy_reference(model, [0, 1], 12)[2:])
    for flag in ([], ["--no-kv-cache"]):
        argv = ["generate", "--run-dir", "x", "--prompt", "ab", "--max-new-tokens", "12", "--temperature", "0", *flag]
        assert cli.main(argv) == 0
        out, err = capsys.readouterr()
        assert out == "ab" + new + "\n"
        assert "12 tokens in" in err and "tokens/s" in err and ("no kv cache" in err) == bool(flag)
