"""Sampling text from a trained model: `meshtrain generate --run-dir DIR --prompt "..."`.

By default the prompt is run once and each new token reuses the keys and values cached for the
ones before it (meshtrain.model.kv_cache); `kv_cache=False` recomputes the whole window instead.
Each token is drawn after temperature, top-k and top-p (nucleus) filtering, from a seeded
generator, so a seed reproduces a text; temperature 0 takes the most likely token. Generation ends
after max_new_tokens, at the tokenizer's end-of-text token, or once a stop text appears.
See docs/generation.md.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from meshtrain import checkpoint as ckpt
from meshtrain.config import Config, ConfigError, load_config
from meshtrain.data.tokenizer import Tokenizer, build_tokenizer
from meshtrain.model import Llama, build_model
from meshtrain.model.kv_cache import KVCache
from meshtrain.model.moe import moe_layers

NextLogits = Callable[[list[int]], torch.Tensor]
"""All token ids so far -> fp32 logits (vocab,) of the next token, on the CPU."""


@dataclass(frozen=True)
class Sampling:
    """How each token is chosen; checked on construction, so bad input fails before any forward."""

    temperature: float = 0.8
    """Softmax temperature; 0 takes the most likely token (greedy)."""
    top_k: int = 40
    """Draw among the k most likely tokens only; 0 = all."""
    top_p: float = 1.0
    """Draw among the fewest most likely tokens whose probabilities reach p (nucleus); 1 = all."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature {self.temperature} must be a number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top-k {self.top_k} must be >= 0 (0 = no top-k filter)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top-p {self.top_p} must be in (0, 1] (1 = no nucleus filter)")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (vocab,) with every token outside the top-k and outside the top-p nucleus set to -inf."""
    out = logits.clone()
    if 0 < top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = -math.inf
    if top_p < 1.0:
        ordered, order = out.sort(descending=True)
        probs = ordered.softmax(-1)
        # A token stays while the tokens more likely than it hold less than top_p: the most likely
        # one always stays, and so does the token that carries the sum past top_p.
        drop = probs.cumsum(-1) - probs >= top_p
        out[order[drop]] = -math.inf
    return out


def next_token(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> int:
    """One token id from fp32 logits (vocab,), drawn as `sampling` says with the generator `gen`."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    kept = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return int(torch.multinomial(torch.softmax(kept, -1), 1, generator=gen))


def window_logits(model: Llama, device: torch.device) -> NextLogits:
    """Next-token logits recomputed over the newest max_seq_len tokens each call (no cache)."""
    window = model.cfg.max_seq_len

    def step(ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids[-window:]], device=device))[0, -1].float().cpu()

    return step


class CachedLogits:
    """Next-token logits with a KV cache: the first call prefills, later calls feed only new tokens.

    The cache holds at most max_seq_len positions (the rotary tables end there). When the next token
    would not fit, the newest 3/4 of the window is prefilled afresh at positions 0 .. from then on, as
    if the text had begun there: one batched forward per max_seq_len/4 new tokens, and at least 3/4
    of a window of context throughout. (The uncached path slides its window by one token instead,
    so the two agree exactly until the first refill.)
    """

    def __init__(self, model: Llama, device: torch.device) -> None:
        self.model, self.device = model, device
        self.window = model.cfg.max_seq_len
        self.keep = max(1, 3 * self.window // 4)
        self.cache = KVCache(self.window)
        self.start = 0
        """Index in the ids of the token at cache position 0."""

    def __call__(self, ids: list[int]) -> torch.Tensor:
        if len(ids) - self.start > self.window:
            self.start = len(ids) - min(self.keep, len(ids))
            self.cache.reset()
        new = ids[self.start + self.cache.length :]
        return self.model(torch.tensor([new], device=self.device), cache=self.cache)[0, -1].float().cpu()


@dataclass
class Generation:
    """A finished sample: the text (prompt included) and what it cost."""

    text: str
    new_tokens: int
    seconds: float
    stopped: str
    """Why it ended: "length" (max_new_tokens), "eos" or "stop" (a stop text)."""


def _stop_cut(tok: Tokenizer, new: list[int], stops: Sequence[str]) -> str | None:
    """The generated text before the first stop text in it, or None while it holds none."""
    text = tok.decode(new)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else None


@torch.no_grad()
def generate(
    model: Llama,
    tok: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    device: torch.device,
    sampling: Sampling | None = None,
    stop: Sequence[str] = (),
    kv_cache: bool = True,
) -> Generation:
    """Continue `prompt` token by token; the end-of-text token and the stop texts are left out of the text."""
    sampling = sampling or Sampling()
    if max_new_tokens < 0:
        raise ConfigError(f"max-new-tokens {max_new_tokens} must be >= 0")
    if any(not s for s in stop):
        raise ConfigError("a stop text must not be empty")
    gen = torch.Generator().manual_seed(sampling.seed)
    prompt_ids = tok.encode(prompt).tolist() or [0]  # an empty prompt starts from token 0
    logits_of = CachedLogits(model, device) if kv_cache else window_logits(model, device)
    new: list[int] = []
    was_training, stopped, cut = model.training, "length", None
    model.eval()
    began = time.perf_counter()
    try:
        while len(new) < max_new_tokens:
            token = next_token(logits_of(prompt_ids + new), sampling, gen)
            if token == tok.eos_id:
                stopped = "eos"
                break
            new.append(token)
            if stop and (cut := _stop_cut(tok, new, stop)) is not None:
                stopped = "stop"
                break
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - began
    text = tok.decode(prompt_ids + new) if cut is None else tok.decode(prompt_ids) + cut
    return Generation(text, len(new), seconds, stopped)


def sample_text(
    model: Llama,
    tok: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    device: torch.device,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    kv_cache: bool = True,
) -> str:
    """The prompt and its continuation, sampled with top-k at `temperature` (see generate)."""
    sampling = Sampling(temperature=temperature, top_k=top_k, seed=seed)
    return generate(model, tok, prompt, max_new_tokens, device, sampling, kv_cache=kv_cache).text


def load_for_generation(run_dir: Path, step: int | None = None) -> tuple[Llama, Tokenizer, int]:
    """Rebuild the model from the newest checkpoint's (or step `step`'s) own config.toml (the config
    it was trained with: RUN_DIR/config.toml may belong to a later run) and load its weights."""
    model, cfg, at = load_checkpoint_model(run_dir, step)
    return model, build_tokenizer(cfg.data.tokenizer), at


def load_checkpoint_model(run_dir: Path, step: int | None = None) -> tuple[Llama, Config, int]:
    """(one process's model, the config it was trained with, its step) from a checkpoint of any layout."""
    return model_at(checkpoint_path(run_dir, step))


def checkpoint_path(run_dir: Path, step: int | None = None) -> Path:
    """The newest complete checkpoint of a run (or step `step`'s), its files verified."""
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
    return path


def model_at(path: Path) -> tuple[Llama, Config, int]:
    """One process's model from the checkpoint folder `path`, with the config it was trained with."""
    cfg = load_config(path / "config.toml")
    model = build_model(cfg.model, "cpu", seed=cfg.training.seed)
    state = {"model": dict(model.named_parameters())}
    with warnings.catch_warnings():
        # DCP warns that it loads without a process group: exactly what a one-process sampler wants.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        meta = ckpt.load(path, state, load_rng=False)
    load_balancing_biases(model, path)
    return model, cfg, int(meta["step"])


def load_balancing_biases(model: Llama, path: Path) -> None:
    """MoE's balancing biases are hook state, not parameters (meshtrain.expert_balance), saved apart
    in the checkpoint; under load_balance = bias they choose the experts, so sampling, evaluating or
    exporting without them would compute another model."""
    layers = moe_layers([model])
    if not layers:
        return
    hooks = {f"{name}.gate.e_score_correction_bias": m.gate.e_score_correction_bias for name, m in layers.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, no group
        ckpt.load(path, {"hooks": hooks}, load_rng=False)
