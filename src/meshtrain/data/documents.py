"""Documents read from files: what `meshtrain tokenizer train` and `meshtrain prepare-data` consume.

A plain text file (.txt, .md, .py, or any file named on the command line) is one document; a .jsonl
file holds one per line (its "text" field); a .parquet file one per row (its "text" column, read
through the optional pyarrow). Folders are searched recursively in sorted order, so the same inputs
always give the same documents in the same order. Empty documents are skipped: they would add
nothing but an end-of-document token.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from meshtrain.config import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL, PARQUET = ".jsonl", ".parquet"
SUFFIXES = (*TEXT_SUFFIXES, JSONL, PARQUET)
FIELD = "text"


def find_inputs(paths: list[str]) -> list[Path]:
    """The files behind --input PATHS: files as given, folders searched for SUFFIXES (one-line errors)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"--input {raw!r} does not exist; give text, .jsonl or .parquet files or folders")
        if path.is_file():
            files.append(path)
        else:
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES))
    if not files:
        raise ConfigError(f"--input {' '.join(paths)}: no file ending in {', '.join(SUFFIXES)} found")
    if any(p.suffix == PARQUET for p in files) and importlib.util.find_spec("pyarrow") is None:
        raise ConfigError("reading .parquet input needs pyarrow; pip install pyarrow (or meshtrain[parquet])")
    return files


def iter_documents(files: list[Path], advance: Callable[[int], None] = lambda n: None) -> Iterator[str]:
    """Every non-empty document of `files`, in order; `advance(n)` is told of each n bytes read."""
    for path in files:
        if path.suffix == JSONL:
            yield from _jsonl(path, advance)
        elif path.suffix == PARQUET:
            yield from _parquet(path, advance)
        else:
            data = path.read_bytes()
            advance(len(data))
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue  # a binary file found in a folder is not text to learn from
            if text:
                yield text


def _jsonl(path: Path, advance: Callable[[int], None]) -> Iterator[str]:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            advance(len(line))
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{path}:{number} is not valid JSON ({exc}); one JSON object a line") from None
            text = record.get(FIELD) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ConfigError(f'{path}:{number} has no string field "{FIELD}"; each line needs one')
            if text:
                yield text


def _parquet(path: Path, advance: Callable[[int], None]) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if FIELD not in table.schema_arrow.names:
        raise ConfigError(f'{path} has no "{FIELD}" column (it has {", ".join(table.schema_arrow.names)})')
    rows, size = max(table.metadata.num_rows, 1), path.stat().st_size
    for batch in table.iter_batches(columns=[FIELD], batch_size=1024):
        advance(size * batch.num_rows // rows)  # progress in bytes, the file's size shared over its rows
        yield from (text for text in batch.column(0).to_pylist() if text)


def total_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)
