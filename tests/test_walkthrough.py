"""The README's "fine-tune a Hugging Face model on your own text", run as written: its commands are
read from the README and executed in a fresh folder holding a tiny random LlamaForCausalLM (made
offline by transformers, with a byte-level BPE tokenizer learnt from the texts) and some text. The
fine-tune trains, its loss falls, it evaluates, and it exports a folder that transformers
loads and that computes our checkpoint's logits."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from dist_utils import read_metrics
from meshtrain.generate import load_checkpoint_model
from meshtrain.tools.tokenizer_cli import train_bpe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.e2e
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_model_state_bytes", "peak_rss_bytes"}


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- walkthrough:", 1)[1].split("<!-- end walkthrough -->", 1)[0]
    lines = block.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    return [shlex.split(line) for line in lines if line.startswith("meshtrain ")]


def run(where: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "meshtrain", *argv[1:]], capture_output=True, text=True, timeout=300, env=env, cwd=where
    )
    assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def _setting(where: Path) -> None:
    """my-texts/ (some of the interpreter's own sources), hf-model/ (tokenizer + tiny Llama), configs/."""
    texts = where / "my-texts"
    texts.mkdir()
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-f]*.py"))[:40]
    for i, path in enumerate(sources):
        shutil.copy(path, texts / f"doc{i}.txt")
    # the model's tokenizer, learnt in this process (`meshtrain tokenizer train` is tested on its own)
    tokenizer = train_bpe((p.read_text() for p in sorted(texts.iterdir())), 512, 2, "<|endoftext|>")
    tokenizer.save(str(where / "tok.json"))
    size = tokenizer.get_vocab_size()
    config = transformers.LlamaConfig(
        vocab_size=size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(where / "hf-model")
    shutil.move(where / "tok.json", where / "hf-model" / "tokenizer.json")
    (where / "configs").symlink_to(ROOT / "configs")


def test_the_readme_fine_tune_runs_as_written(tmp_path: Path) -> None:
    commands = readme_commands()
    assert [c[1] for c in commands] == ["prepare-data", "train", "export-hf"]
    _setting(tmp_path)
    outputs = [run(tmp_path, argv) for argv in commands]
    records = read_metrics(tmp_path / "runs" / "ft")
    assert len(records) == 20 and set(records[0]) >= METRIC_KEYS
    first, last = sum(r["loss"] for r in records[:5]) / 5, sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.2, (first, last)
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20]
    assert "initialised from hf-model" in outputs[1].stdout + outputs[1].stderr
    assert (tmp_path / "runs" / "ft" / "config.toml").read_text().count("dp_shard = 2") == 1
    # the export is our step-20 model: transformers computes its logits, with its tokenizer beside it
    ours, _, step = load_checkpoint_model(tmp_path / "runs" / "ft")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ft-model").eval()
    tokens = torch.randint(0, ours.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert step == 20 and (ours(tokens) - theirs(tokens).logits).abs().max() < 1e-4
    assert (tmp_path / "ft-model" / "tokenizer.json").read_bytes() == (
        tmp_path / "hf-model" / "tokenizer.json"
    ).read_bytes()
