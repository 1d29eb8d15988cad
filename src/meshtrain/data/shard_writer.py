"""Writing one split of prepared token data as shards (the format is in meshtrain.data.shards)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import numpy as np

from meshtrain.data.shards import shard_name


class ShardWriter:
    """Appends documents (tokens with their end-of-document id) to `split`'s shards under `root`."""

    def __init__(self, root: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.shard_tokens = root, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: IO[bytes] | None = None
        self._starts: list[int] = []
        self._tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents of `lengths` tokens each, laid end to end in `tokens`."""
        doc, offset = 0, 0
        while doc < len(lengths):
            ends = np.cumsum(lengths[doc:])
            # the documents up to the one that fills this shard go in it; the rest start the next
            k = min(int(np.searchsorted(ends, self.shard_tokens - self._tokens)) + 1, len(lengths) - doc)
            n = int(ends[k - 1])
            self._write(tokens[offset : offset + n], lengths[doc : doc + k])
            doc, offset = doc + k, offset + n
            if self._tokens >= self.shard_tokens:
                self._finish_shard()

    def close(self) -> dict[str, Any]:
        """Finish the open shard; return the split's summary for meta.json."""
        if self._file is not None:
            self._finish_shard()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }

    def _write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if self._file is None:
            # "x": a new file only; an existing one (someone else's) is never truncated
            self._file = (self.root / f"{shard_name(self.split, len(self.shards))}.bin").open("xb")
        starts = self._tokens + np.concatenate(([0], np.cumsum(lengths)[:-1]))
        self._starts.extend(int(s) for s in starts)
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._tokens += len(tokens)

    def _finish_shard(self) -> None:
        if self._file is None:
            raise RuntimeError("_finish_shard needs an open shard")
        name = shard_name(self.split, len(self.shards))
        _sync_close(self._file)
        with (self.root / f"{name}.idx").open("xb") as f:
            f.write(np.asarray([*self._starts, self._tokens], dtype=np.int64).tobytes())
            _sync_close(f)
        self.shards.append({"name": name, "tokens": self._tokens, "documents": len(self._starts)})
        self._file, self._starts, self._tokens = None, [], 0


def _sync_close(f: IO[bytes]) -> None:
    # on disk before meta.json names it: a crash must not leave a finished-looking folder of holes
    f.flush()
    os.fsync(f.fileno())
    f.close()


def read_index(path: Path) -> np.ndarray:
    """A shard's document offsets (n_docs + 1 of them: each start, then the end)."""
    return np.fromfile(path, dtype=np.int64)
