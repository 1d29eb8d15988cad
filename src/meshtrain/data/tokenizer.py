"""Tokenizers: bytes by default (vocab 256, nothing to download), or a tokenizer.json file.

Each has an end-of-document id, `eos_id`, which `meshtrain prepare-data` writes after every
document. The byte tokenizer has no spare id (all 256 are bytes), so it uses 0, the NUL byte: valid
text practically never holds one, and the vocabulary (and so model.vocab_size = 256) stays as it is.
A tokenizer.json names its own: the first of EOS_TOKENS among its special tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

# End-of-document tokens of the common tokenizer families, in the order they are looked for.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
BYTE_EOS = 0


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None
    """The token that ends a text, where the vocabulary has one; generation stops on it."""

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    vocab_size = 256
    eos_id: int | None = BYTE_EOS

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
        self.eos_id = find_eos(self._tok)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))


def find_eos(tok: Any) -> int | None:
    """The id of the first of EOS_TOKENS that `tok` (a tokenizers.Tokenizer) holds as a special token."""
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    return next((tok.token_to_id(name) for name in EOS_TOKENS if name in special), None)


def build_tokenizer(spec: str) -> Tokenizer:
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise FileNotFoundError(f"data.tokenizer={spec!r}: no such file; use 'byte' or a tokenizer.json path")
    return JsonTokenizer(spec)
