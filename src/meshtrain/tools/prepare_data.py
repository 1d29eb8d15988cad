"""`meshtrain prepare-data`: tokenize a corpus in parallel into memory-mappable token shards.

The parent process reads documents (meshtrain.data.documents) in order and hands batches of them to
worker processes, which tokenize and append the end-of-document id; the parent writes the results
back in input order, so the shards do not depend on --workers. Whole documents are held out for
validation. The format is described in meshtrain.data.shards and docs/data.md.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from meshtrain.config import ConfigError
from meshtrain.data.documents import SUFFIXES, find_inputs, iter_documents, total_bytes
from meshtrain.data.shard_writer import ShardWriter
from meshtrain.data.shards import claim_output, dtype_for, write_meta
from meshtrain.data.tokenizer import EOS_TOKENS, Tokenizer, build_tokenizer
from meshtrain.preflight import tokenizer_vocab

BATCH_CHARS = 1 << 20  # text per task: large enough to amortise the hand-off, small enough to spread

_EXAMPLES = """\
examples:
  meshtrain prepare-data --input corpus/ --tokenizer byte --out data/corpus --val-fraction 0.01
  meshtrain prepare-data --input a.jsonl b.parquet --tokenizer tokenizer.json --out data/ab --workers 8
then train on it: --set data.source=tokens --set data.path=data/corpus
"""


def add_parser(subparsers: Any) -> None:
    """Register the `prepare-data` subcommand."""
    p = subparsers.add_parser(
        "prepare-data",
        help="tokenize a corpus into memory-mapped token shards (data.source=tokens)",
        description=__doc__,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, help=f"files or folders ({', '.join(SUFFIXES)})")
    p.add_argument("--tokenizer", default="byte", help="byte (the default) or a tokenizer.json path")
    p.add_argument("--out", required=True, help="folder to write; new, empty, or an earlier prepare-data output")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizing processes")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of documents held out (default 0)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="close a shard at this many tokens")
    p.add_argument("--eos", help=f"end-of-document special token (default: the first of {', '.join(EOS_TOKENS)})")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier finished prepare-data output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate everything, then tokenize and write; returns the exit status."""
    if args.workers < 1 or args.shard_tokens < 1:
        raise ConfigError(f"--workers {args.workers} and --shard-tokens {args.shard_tokens} must be at least 1")
    if not (math.isfinite(args.val_fraction) and 0 <= args.val_fraction < 0.5):
        raise ConfigError(f"--val-fraction {args.val_fraction} must be in [0, 0.5)")
    vocab = tokenizer_vocab(args.tokenizer)  # one-line errors for a missing or broken file
    eos = eos_id(build_tokenizer(args.tokenizer), args.tokenizer, args.eos)
    files = find_inputs(args.input)
    out = Path(args.out)
    claim_output(out, args.overwrite)
    dtype = dtype_for(vocab)
    writers = {s: ShardWriter(out, s, dtype, args.shard_tokens) for s in ("train", "val")}
    split = Splitter(args.val_fraction, writers)
    with byte_progress("tokenizing", total_bytes(files)) as advance:
        docs = iter_documents(files, advance)
        tokenize(batches(docs), args.tokenizer, eos, dtype, args.workers, split)
    splits = {s: w.close() for s, w in writers.items()}
    write_meta(out, _meta(args, vocab, eos, dtype, splits, files))
    for s, info in splits.items():
        print(f"{s}: {info['tokens']:,} tokens, {info['documents']:,} documents, {len(info['shards'])} shard(s)")
    if args.val_fraction > 0 and not splits["val"]["documents"]:
        print(f"warning: no document fell in the validation split ({split.seen} x {args.val_fraction} < 0.5)")
    print(f"{out}: train with --set data.source=tokens --set data.path={out} --set data.tokenizer={args.tokenizer}")
    return 0


def eos_id(tok: Tokenizer, spec: str, name: str | None) -> int:
    """The end-of-document id: --eos by name, else the tokenizer's own (one-line errors)."""
    if name is None:
        if tok.eos_id is None:
            raise ConfigError(
                f"--tokenizer {spec!r} has none of the special tokens {', '.join(EOS_TOKENS)}; "
                "name its end-of-document token with --eos"
            )
        return tok.eos_id
    ids = tok.encode(name)
    if len(ids) != 1:
        raise ConfigError(
            f"--eos {name!r} is not a single token of --tokenizer {spec!r}; name one of its special tokens"
        )
    return int(ids[0])


def _meta(
    args: argparse.Namespace, vocab: int, eos: int, dtype: str, splits: dict[str, Any], files: list[Path]
) -> dict[str, Any]:
    spec = args.tokenizer
    digest = None if spec == "byte" else hashlib.sha256(Path(spec).read_bytes()).hexdigest()
    return {
        "dtype": dtype,
        "vocab_size": vocab,
        "eos_id": eos,
        "tokenizer": spec,
        "tokenizer_sha256": digest,
        "val_fraction": args.val_fraction,
        "inputs": len(files),
        "splits": splits,
    }


class Splitter:
    """Sends each document to train or val: document i is held out when round(i*f) steps up, which
    spreads round(n*f) validation documents evenly over any n, whatever the batching."""

    def __init__(self, fraction: float, writers: dict[str, ShardWriter]) -> None:
        self.fraction, self.writers, self.seen = fraction, writers, 0

    def __call__(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        i = self.seen + np.arange(len(lengths), dtype=np.float64)
        held = np.floor((i + 1) * self.fraction + 0.5) > np.floor(i * self.fraction + 0.5)
        self.seen += len(lengths)
        per_token = np.repeat(held, lengths)
        for split, docs, toks in (("train", ~held, ~per_token), ("val", held, per_token)):
            if docs.any():
                self.writers[split].add(tokens[toks], lengths[docs])


def batches(docs: Iterator[str], max_chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    """Documents grouped into lists of about max_chars characters (a long document goes alone)."""
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_worker: tuple[Tokenizer, int, str] | None = None  # this worker's tokenizer, EOS id and dtype


def _init_worker(spec: str, eos: int, dtype: str) -> None:
    global _worker
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
    _worker = (build_tokenizer(spec), eos, dtype)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One batch: its documents' tokens, each followed by the EOS id, and their lengths."""
    if _worker is None:
        raise RuntimeError("_init_worker runs first in every worker")
    tok, eos, dtype = _worker
    parts = [np.append(tok.encode(text), eos).astype(dtype) for text in texts]
    return np.concatenate(parts), np.asarray([len(p) for p in parts], dtype=np.int64)


Sink = Callable[[np.ndarray, np.ndarray], None]


def tokenize(texts: Iterator[list[str]], spec: str, eos: int, dtype: str, workers: int, sink: Sink) -> None:
    """Tokenize every batch, handing the results to `sink` in input order."""
    if workers == 1:  # no processes to start: what tests and small corpora want
        _init_worker(spec, eos, dtype)
        for batch in texts:
            sink(*_encode(batch))
        return
    # spawn, not fork: the parent runs a progress thread and may hold the tokenizers library's state
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(spec, eos, dtype)
    ) as pool:
        pending: deque[Future[tuple[np.ndarray, np.ndarray]]] = deque()
        for batch in texts:
            pending.append(pool.submit(_encode, batch))
            if len(pending) >= 2 * workers:  # bounded: results wait in memory only this many batches deep
                sink(*pending.popleft().result())
        while pending:
            sink(*pending.popleft().result())


@contextmanager
def byte_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar over `total` bytes of input on stderr (a terminal); yields the function that advances it."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = Console(file=sys.stderr)
    if not console.is_terminal:  # a log file gets the summary lines, not a bar's last frame
        yield lambda n: None
        return
    columns = (
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=max(total, 1))
        yield lambda n: progress.advance(task, n)
