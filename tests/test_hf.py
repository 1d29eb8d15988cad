"""Hugging Face parity, against transformers' own models (built offline, tiny and random): import
gives transformers' logits, export gives a folder transformers loads and generates the same tokens
from, HF -> meshtrain -> HF is bit-identical, and what we cannot compute is refused by name."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from meshtrain.accounting import CommStats
from meshtrain.config import ConfigError, ModelConfig, load_config
from meshtrain.hf.config import read_hf_config, write_hf_config
from meshtrain.hf.weights import load_hf_model, load_hf_weights, save_hf_weights
from meshtrain.model import Llama, build_model
from meshtrain.validate import validate
from meshtrain.zero import ShardGroups, Zero3
from meshtrain.zero.base import ModelState

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.pure
SMALL = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "max_position_embeddings": 64}
CASES: dict[str, tuple[str, dict[str, Any]]] = {  # name: (transformers class, config)
    "gqa-untied-theta": (
        "Llama",
        {**SMALL, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 5e4},
    ),
    "tied": (
        "Llama",
        {
            **SMALL,
            "intermediate_size": 48,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "tie_word_embeddings": True,
        },
    ),
    "mixtral": (
        "Mixtral",
        {**SMALL, "intermediate_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4},
    ),
}


def _hf_model(case: str, seed: int = 0) -> Any:
    kind, kwargs = CASES[case]
    config = getattr(transformers, f"{kind}Config")(**kwargs, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(config)
    with torch.no_grad():  # transformers zero-inits nothing we rely on, but make every weight non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _export(model: Llama, out: Path, max_bytes: int = 2**30) -> list[str]:
    """What `meshtrain export-hf` writes for a model (its CLI wraps exactly these two)."""
    out.mkdir()
    files = save_hf_weights(dict(model.named_parameters()), out, torch.float32, max_bytes)
    (out / "config.json").write_text(json.dumps(write_hf_config(model.cfg, "float32")))
    return files


def _greedy(model: Llama, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt.tolist()
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("case", list(CASES))
def test_an_imported_model_computes_transformers_logits(case: str, tmp_path: Path) -> None:
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path)
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max()
    assert diff < 1e-4, diff
    assert ours.cfg.tie_embeddings == (case == "tied") and ours.cfg.n_experts == (4 if case == "mixtral" else 0)


@pytest.mark.parametrize("case", ["gqa-untied-theta", "mixtral"])
def test_an_exported_model_loads_in_transformers_and_generates_our_tokens(case: str, tmp_path: Path) -> None:
    hf_shape = read_hf_config_of(case, tmp_path / "shape")
    ours = build_model(dataclasses.replace(ModelConfig(**hf_shape), init_std=0.2), seed=3)
    _export(ours, tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    prompt = torch.tensor([5, 17, 42, 8])
    with torch.no_grad():
        diff = (ours(prompt[None]) - theirs(prompt[None]).logits).abs().max()
        generated = theirs.generate(prompt[None], max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert diff < 1e-4, diff
    assert generated[0].tolist() == _greedy(ours, prompt, 12)


def read_hf_config_of(case: str, directory: Path) -> dict[str, Any]:
    _hf_model(case).config.save_pretrained(directory)
    return read_hf_config(directory)


@pytest.mark.parametrize("case", ["gqa-untied-theta", "mixtral"])
def test_hf_to_meshtrain_to_hf_is_bit_identical_and_shards_with_an_index(case: str, tmp_path: Path) -> None:
    """Every tensor bit for bit, every config value transformers reads back the same; with a 20 KB
    shard limit the export is several files plus the index, which transformers loads."""
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    files = _export(load_hf_model(tmp_path / "hf"), tmp_path / "back", max_bytes=20_000)
    assert len(files) > 2 and "model.safetensors.index.json" in files
    original = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    back = {}
    for file in set(index["weight_map"].values()):
        back |= safetensors_torch.load_file(tmp_path / "back" / file)
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) and original[k].dtype == back[k].dtype for k in original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    for key in ("hidden_size", "num_key_value_heads", "intermediate_size", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(reloaded.config, key) == getattr(hf.config, key), key
    assert reloaded.config.rope_parameters["rope_theta"] == hf.config.rope_parameters["rope_theta"]


def _write_config(directory: Path, **changes: Any) -> Path:
    _hf_model("gqa-untied-theta").save_pretrained(directory)
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type='llama3' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
        ({"num_hidden_layers": 3}, "model.layers.2.self_attn.q_proj.weight (missing)"),
        ({"intermediate_size": 80}, "model.layers.0.mlp.gate_proj.weight [64, 32] (expected [80, 32])"),
    ],
)
def test_what_we_cannot_compute_is_refused_by_name_before_training(
    changes: dict[str, Any], fragment: str, tmp_path: Path
) -> None:
    directory = _write_config(tmp_path, **changes)
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, [f"model.init_from=hf:{directory}"]), 1)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_init_from_sets_the_model_section_and_only_mixtral_shaped_moe_exports(tmp_path: Path) -> None:
    directory = _write_config(tmp_path / "hf")
    cfg = validate(load_config(None, [f"model.init_from=hf:{directory}", "training.seq_len=32"]), 1)
    assert (cfg.model.dim, cfg.model.n_kv_heads, cfg.model.hidden_dim, cfg.model.rope_theta) == (32, 2, 64, 5e4)
    assert cfg.model.norm_eps == 1e-6 and cfg.model.vocab_size == 96
    shared = ModelConfig(n_experts=4, n_shared_experts=1)
    with pytest.raises(ConfigError, match="model.n_shared_experts=1: only a Mixtral-shaped MoE exports"):
        write_hf_config(shared, "float32")


def test_zero_imports_one_tensor_at_a_time_without_gathering_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZeRO's view never gathers (its state_dict() is made to fail during the import); its shards
    end up holding the Hugging Face weights exactly."""
    hf = _hf_model("gqa-untied-theta")
    hf.save_pretrained(tmp_path)
    engine = Zero3(build_model(ModelConfig(**read_hf_config(tmp_path))), ShardGroups(None, None), CommStats())

    def no_gather(self: ModelState) -> dict[str, torch.Tensor]:
        raise AssertionError("the import gathered the whole model")

    with monkeypatch.context() as patch:
        patch.setattr(ModelState, "state_dict", no_gather)
        load_hf_weights(engine.model_state_dict(), tmp_path)
    loaded = engine.full_params()
    assert all(torch.equal(loaded[name], value) for name, value in hf.state_dict().items() if name in loaded)
    assert len(loaded) == len(hf.state_dict())
