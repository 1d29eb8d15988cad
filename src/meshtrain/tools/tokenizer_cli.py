"""`meshtrain tokenizer train`: learn a byte-level BPE tokenizer (a tokenizer.json) from a corpus.

Byte-level, as GPT-2's: text is split by the ByteLevel pre-tokenizer's regex, every byte is in the
base alphabet (so any text encodes, nothing maps to "unknown"), and the ByteLevel decoder turns ids
back into exactly the text encoded. One special token, the end-of-document token (--eos, default
<|endoftext|>), is added; `meshtrain prepare-data` finds it and writes it after every document.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meshtrain.config import ConfigError
from meshtrain.data.documents import SUFFIXES, find_inputs, iter_documents, total_bytes
from meshtrain.tools.prepare_data import byte_progress

BYTES = 256  # the byte-level alphabet: every vocabulary holds these first

_EXAMPLES = """\
examples:
  meshtrain tokenizer train --input corpus/ --vocab-size 8192 --out tokenizer.json
  meshtrain prepare-data --input corpus/ --tokenizer tokenizer.json --out data/corpus
"""


def add_parser(subparsers: Any) -> None:
    """Register `tokenizer` and its one action, `train`."""
    group = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer (tokenizer.json) on a corpus")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser(
        "train",
        help="learn BPE merges from text files, .jsonl or .parquet",
        description=__doc__,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, help=f"files or folders ({', '.join(SUFFIXES)})")
    p.add_argument("--vocab-size", type=int, required=True, help=f"tokens in all: {BYTES} bytes + merges + EOS")
    p.add_argument("--out", required=True, help="the tokenizer.json to write")
    p.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default 2)")
    p.add_argument("--eos", default="<|endoftext|>", help="the end-of-document special token")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the arguments, train, save; returns the exit status."""
    if args.vocab_size <= BYTES:
        raise ConfigError(f"--vocab-size {args.vocab_size} must exceed {BYTES}: the bytes and the EOS token come first")
    if args.min_frequency < 0:
        raise ConfigError(f"--min-frequency {args.min_frequency} must not be negative")
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {args.out!r} is a folder; give a file name such as {out / 'tokenizer.json'}")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {args.out!r} exists; pass --overwrite to replace it, or choose another name")
    files = find_inputs(args.input)
    try:
        import tokenizers  # noqa: F401  (optional: only this command and tokenizer.json runs need it)
    except ImportError:
        raise ConfigError("meshtrain tokenizer train needs the tokenizers package; pip install tokenizers") from None
    with byte_progress("reading", total_bytes(files)) as advance:
        tok = train_bpe(iter_documents(files, advance), args.vocab_size, args.min_frequency, args.eos)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(out)  # a reader never sees half a file
    print(f"{out}: {tok.get_vocab_size()} tokens (EOS {args.eos!r} = id {tok.token_to_id(args.eos)})")
    return 0


def train_bpe(docs: Iterator[str], vocab_size: int, min_frequency: int, eos: str) -> Any:
    """A byte-level BPE tokenizers.Tokenizer trained on `docs`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # the byte bar above reports the reading, which is most of the time
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok
