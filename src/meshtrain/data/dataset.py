"""Corpora packed into fixed-length training sequences.

A corpus becomes one long token stream (documents joined by a newline); sequence i is the window
stream[i*L : i*L + L + 1], whose first L tokens are the input and last L the targets. Files are read
in sorted order, so every rank and every run sees the same stream.

Validation (`split="val"`): the last `data.val_fraction` of the stream's sequences are held out, and
the training split ends before them; with val_fraction = 0 (the default) training sees the whole
stream, exactly as before, and there is no validation split.

Prepared data (`data.source = "tokens"`, data.path = a `meshtrain prepare-data` folder) is read
through memory maps by `TokenDataset`: the same windows over the concatenation of a split's shards,
gathered per batch, so a process holds only the batch, never the corpus. Its validation split is the
one prepare-data held out (whole documents); data.max_tokens does not apply to it.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import torch

from meshtrain.config import ConfigError, DataConfig
from meshtrain.data.shards import SPLITS, read_meta
from meshtrain.data.tokenizer import Tokenizer


class PackedDataset:
    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(f"corpus has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (len(indices), seq_len)."""
        starts = torch.as_tensor(indices, dtype=torch.int64) * self.seq_len
        windows = starts[:, None] + torch.arange(self.seq_len + 1)
        seqs = self.tokens[windows]
        return seqs[:, :-1], seqs[:, 1:]


class TokenDataset:
    """PackedDataset's sequences over memory-mapped shards: `len()` and `batch()` give the same values."""

    def __init__(self, root: Path, split: str, seq_len: int) -> None:
        meta = read_meta(root)
        shards = [s for s in meta["splits"][split]["shards"] if s["tokens"]]
        if not shards and split == "val":
            raise ConfigError(f"data.path={str(root)!r} has no validation split; prepare it with --val-fraction > 0")
        # mode "r": read-only, so no training run can write into the prepared data
        self.shards = [np.memmap(root / f"{s['name']}.bin", dtype=meta["dtype"], mode="r") for s in shards]
        self.offsets = np.cumsum([0, *(len(m) for m in self.shards)])
        self.seq_len = seq_len
        if self.offsets[-1] < seq_len + 1:
            raise ValueError(f"{split} split has {self.offsets[-1]} tokens, fewer than one sequence of {seq_len + 1}")

    def __len__(self) -> int:
        return (int(self.offsets[-1]) - 1) // self.seq_len

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (len(indices), seq_len), read from the shards now."""
        seqs = torch.from_numpy(np.stack([self._window(int(i) * self.seq_len) for i in np.asarray(indices).ravel()]))
        seqs = seqs.reshape(*np.shape(indices), self.seq_len + 1)
        return seqs[..., :-1], seqs[..., 1:]

    def _window(self, start: int) -> np.ndarray:
        """Tokens start .. start + seq_len of the split, as int64; a window may span shards."""
        end, parts = start + self.seq_len + 1, []
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < end:
            lo, hi = int(self.offsets[shard]), int(self.offsets[shard + 1])
            parts.append(self.shards[shard][start - lo : min(end, hi) - lo])
            start, shard = min(end, hi), shard + 1
        return np.concatenate(parts).astype(np.int64)


def _text_files(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in extensions)


def read_corpus(paths: list[Path], tok: Tokenizer, max_tokens: int) -> np.ndarray:
    chunks, total = [], 0
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a binary or unreadable file is not text to learn from
        ids = tok.encode(text + "\n")
        chunks.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    if not chunks:
        raise ValueError(f"no readable text found in {[str(p) for p in paths[:3]]}")
    return np.concatenate(chunks)[:max_tokens]


def synthetic_tokens(vocab: int, n_tokens: int, seed: int) -> np.ndarray:
    """A sparse random Markov chain: learnable (loss falls well below log(vocab)) and instant."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, 4))
    # The chain is sequential; Python ints walk it about 5x faster than numpy scalars (every test
    # run's every rank builds it), with the same values. A table larger than the walk stays numpy.
    choices = rng.integers(0, 4, size=n_tokens).tolist()
    out, token = [0] * n_tokens, 0
    if successors.size <= n_tokens:
        table = successors.tolist()
        for i in range(1, n_tokens):
            token = out[i] = table[token][choices[i]]
    else:
        for i in range(1, n_tokens):
            token = out[i] = int(successors[token, choices[i]])
    return np.asarray(out, dtype=np.int64)


Dataset = PackedDataset | TokenDataset
"""Either holds fixed-length windows: len() of them, and batch(indices) -> (inputs, targets)."""


def build_dataset(cfg: DataConfig, tok: Tokenizer, seq_len: int, seed: int, split: str = "train") -> Dataset:
    """The training sequences, or the held-out validation ones (module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: one of {SPLITS}")
    if cfg.source == "tokens":
        return TokenDataset(Path(cfg.path), split, seq_len)
    return held_out(token_stream(cfg, tok, seed), seq_len, cfg.val_fraction, split)


def held_out(tokens: np.ndarray, seq_len: int, fraction: float, split: str) -> PackedDataset:
    """Cut a stream into training sequences and, after them, the last `fraction` of its sequences."""
    n = (len(tokens) - 1) // seq_len
    n_val = math.ceil(n * fraction) if fraction > 0 else 0
    if split == "train":
        return PackedDataset(tokens[: (n - n_val) * seq_len + 1], seq_len)
    if n_val == 0:
        raise ConfigError("there is no validation split: set data.val_fraction > 0 (e.g. 0.01)")
    return PackedDataset(tokens[(n - n_val) * seq_len :], seq_len)


def token_stream(cfg: DataConfig, tok: Tokenizer, seed: int) -> np.ndarray:
    """The whole token stream of an in-memory source, before the validation split (`held_out` cuts it)."""
    if cfg.source == "synthetic":
        return synthetic_tokens(tok.vocab_size, min(cfg.max_tokens, 200_000), seed)
    exts = tuple(e.strip() for e in cfg.extensions.split(",") if e.strip())
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        paths = [p for p in _text_files(root, (".py",)) if "site-packages" not in p.parts]
    else:
        if not cfg.path or not Path(cfg.path).exists():
            raise FileNotFoundError(f"data.path={cfg.path!r} does not exist; point it at a text file or folder")
        paths = _text_files(Path(cfg.path), exts)
    return read_corpus(paths, tok, cfg.max_tokens)
