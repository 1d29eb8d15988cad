"""`model.init_from = "hf:DIR"` under every layout: a LlamaForCausalLM (and a MixtralForCausalLM)
made by transformers, offline, trains to the same losses on one process and under ZeRO-3 (which
imports one tensor at a time), TP, PP, CP and EP with ZeRO-1; the first step's loss is transformers' own
loss on that batch (the oracle)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from checks import assert_same_training
from dist_utils import Run, train_named
from meshtrain.config import DataConfig
from meshtrain.data import BatchSampler, build_dataset, build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.dist
SHAPE = {"vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 2, "max_position_embeddings": 64}
MODELS = {
    "llama": (
        "Llama",
        {"intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 5e4},
    ),
    "mixtral": ("Mixtral", {"intermediate_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2}),
}
BASE = ["training.steps=3", "data.source=synthetic", "checkpoint.interval=0", "training.seq_len=32"]
LAYOUTS = {  # name: (model, nproc, overrides)
    "z3-dp2": ("llama", 2, ["training.micro_batch=4", "parallel.zero_stage=3"]),
    "tp2": ("llama", 2, ["training.micro_batch=8", "parallel.tp=2"]),
    "pp2": ("llama", 2, ["training.micro_batch=4", "parallel.pp=2"]),
    "cp2": ("llama", 2, ["training.micro_batch=8", "parallel.cp=2"]),
    "ep2-z1": ("mixtral", 2, ["training.micro_batch=4", "parallel.ep=2", "parallel.zero_stage=1"]),
}


def _save(name: str, directory: Path) -> Any:
    kind, extra = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(getattr(transformers, f"{kind}Config")(**SHAPE, **extra))
    model.save_pretrained(directory)
    return model.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hf")
    hf = {name: _save(name, root / f"hf-{name}") for name in MODELS}
    specs = {
        f"one-{m}": Run(
            root / f"one-{m}", 1, [*BASE, f"model.init_from=hf:{root / f'hf-{m}'}", "training.micro_batch=8"]
        )
        for m in MODELS
    }
    for name, (m, nproc, overrides) in LAYOUTS.items():
        specs[name] = Run(root / name, nproc, [*BASE, f"model.init_from=hf:{root / f'hf-{m}'}", *overrides])
    return {"hf": hf, "runs": train_named(specs)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_imported_model_trains_alike_on_every_layout(layout: str, runs: dict) -> None:
    model = LAYOUTS[layout][0]
    assert_same_training(runs["runs"][layout][1], runs["runs"][f"one-{model}"][1], loss=1e-5, grad_norm=1e-5)


@pytest.mark.parametrize("model", list(MODELS))
def test_the_first_loss_is_transformers_loss_on_the_same_batch(model: str, runs: dict) -> None:
    """tiny.toml's global batch of 8 x 32 tokens of the synthetic corpus (seed 1234), its first step's."""
    data = build_dataset(DataConfig(source="synthetic"), build_tokenizer("byte"), 32, seed=1234)
    first = BatchSampler(len(data), 8, 8, 0, 1, seed=1234).global_indices(0)
    tokens, targets = data.batch(first)
    with torch.no_grad():
        logits = runs["hf"][model](tokens).logits
    expected = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1)).item()
    assert runs["runs"][f"one-{model}"][1][0]["loss"] == pytest.approx(expected, rel=1e-5)
