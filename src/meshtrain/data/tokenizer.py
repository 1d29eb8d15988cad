"""Tokenizers: bytes by default (vocab 256, nothing to download), or a tokenizer.json file."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

# Special tokens that end a document in common tokenizer.json files (GPT-2, Llama 2 and 3, Gemma, ...).
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None
    """The token that ends a text, where the vocabulary has one; generation stops on it."""

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    vocab_size = 256
    eos_id: int | None = None  # every byte value is text

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A Hugging Face `tokenizers` model from a local tokenizer.json (the package is optional)."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise RuntimeError("data.tokenizer points to a tokenizer.json; pip install tokenizers") from None
        self._tok = HFTokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()
        found = (self._tok.token_to_id(name) for name in EOS_TOKENS)
        self.eos_id: int | None = next((i for i in found if i is not None), None)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))


def build_tokenizer(spec: str) -> Tokenizer:
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise FileNotFoundError(f"data.tokenizer={spec!r}: no such file; use 'byte' or a tokenizer.json path")
    return JsonTokenizer(spec)
