"""Sampling text from a trained model: `meshtrain generate --run-dir DIR --prompt "..."`."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from meshtrain import checkpoint as ckpt
from meshtrain.config import Config, ConfigError, load_config
from meshtrain.data.tokenizer import Tokenizer, build_tokenizer
from meshtrain.model import Llama, build_model


@torch.no_grad()
def sample_text(
    model: Llama,
    tok: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    device: torch.device,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> str:
    """Top-k sampling; recomputes the whole window each token (no KV cache: the models here are tiny)."""
    gen = torch.Generator().manual_seed(seed)
    ids = tok.encode(prompt).tolist() or [0]
    window = model.cfg.max_seq_len
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-window:]], device=device)
        logits = model(x)[0, -1].float().cpu() / max(temperature, 1e-5)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits[logits < kth] = -float("inf")
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
    model.train(was_training)
    return tok.decode(ids)


def load_for_generation(run_dir: Path, step: int | None = None) -> tuple[Llama, Tokenizer, int]:
    """Rebuild the model from the newest checkpoint's (or step `step`'s) own config.toml (the config
    it was trained with: RUN_DIR/config.toml may belong to a later run) and load its weights."""
    model, cfg, at = load_checkpoint_model(run_dir, step)
    return model, build_tokenizer(cfg.data.tokenizer), at


def load_checkpoint_model(run_dir: Path, step: int | None = None) -> tuple[Llama, Config, int]:
    """(one process's model, the config it was trained with, its step) from a checkpoint of any layout."""
    if not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} does not exist; pass the folder of a `meshtrain train` run")
    root = run_dir / "checkpoints"
    if step is None:
        path = ckpt.latest(root, warn=lambda text: print(f"warning: {text}", file=sys.stderr))
    else:
        path = ckpt.step_dir(root, step)
        if ckpt.committed(path) is None or ckpt.verify(path) is not None:
            steps = sorted(int(ckpt.read_meta(p)["step"]) for p in ckpt.candidates(root))
            raise ConfigError(f"--step {step}: no complete checkpoint of that step under {root}; there are {steps}")
    if path is None:
        raise ConfigError(f"no complete checkpoint under {root}; train with checkpoint.interval > 0")
    cfg = load_config(path / "config.toml")
    model = build_model(cfg.model, "cpu", seed=cfg.training.seed)
    state = {"model": dict(model.named_parameters())}
    with warnings.catch_warnings():
        # DCP warns that it loads without a process group: exactly what a one-process sampler wants.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        meta = ckpt.load(path, state, load_rng=False)
    return model, cfg, int(meta["step"])
