"""The on-disk format of prepared token data (`meshtrain prepare-data`), and the checks of a folder of it.

    DIR/meta.json          written last: its presence means the folder is complete
    DIR/train-00000.bin    tokens, raw little-endian uint16 (vocabulary <= 65536) or uint32
    DIR/train-00000.idx    int64 offsets into the .bin: where each document starts, then its end
    DIR/val-00000.bin ...  the same for the validation split (whole documents held out)

Every document is followed by the tokenizer's end-of-document id (meta.json's eos_id). A shard holds
whole documents and is closed once it holds at least --shard-tokens tokens. While prepare-data runs,
DIR/.incomplete marks the folder as its own unfinished output.

Standard library only: config validation reads meta.json before any process (or torch) starts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from meshtrain.config import ConfigError, DataConfig

FORMAT, VERSION = "meshtrain-tokens", 1
META, INCOMPLETE = "meta.json", ".incomplete"
OWN_NAMES = (META, f"{META}.tmp", INCOMPLETE)
SPLITS = ("train", "val")
OWN_FILE = re.compile(r"^(train|val)-\d{5}\.(bin|idx)$")
DTYPE_BYTES = {"uint16": 2, "uint32": 4}


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def dtype_for(vocab_size: int) -> str:
    """The narrowest token dtype that holds every id below vocab_size."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def read_meta(root: Path, key: str = "data.path") -> dict[str, Any]:
    """meta.json of a finished prepare-data folder, its shards checked against it (one-line errors)."""
    hint = "run `meshtrain prepare-data --out DIR` first"
    if not root.is_dir():
        raise ConfigError(f"{key}={str(root)!r} is not a folder; {hint}")
    if not (root / META).is_file():
        state = "an interrupted prepare-data run" if (root / INCOMPLETE).exists() else "no prepared data"
        raise ConfigError(f"{key}={str(root)!r} holds {state} (no {META}); {hint}")
    try:
        meta = json.loads((root / META).read_text())
    except ValueError as exc:
        raise ConfigError(f"{key}={str(root)!r}: {META} is not valid JSON ({exc}); {hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(f"{key}={str(root)!r}: {META} is not {FORMAT} version {VERSION}; {hint}")
    try:
        shards = [(shard["name"], shard["tokens"]) for split in SPLITS for shard in meta["splits"][split]["shards"]]
        width = DTYPE_BYTES[meta["dtype"]]
    except (KeyError, TypeError):
        raise ConfigError(f"{key}={str(root)!r}: {META} lacks the splits or the dtype; {hint}") from None
    for name, tokens in shards:
        path = root / f"{name}.bin"
        size = path.stat().st_size if path.is_file() else -1
        if size != tokens * width:
            raise ConfigError(
                f"{key}={str(root)!r}: {path.name} should hold {tokens} tokens ({tokens * width} bytes) "
                f"but {'is missing' if size < 0 else f'has {size} bytes'}; prepare the data again"
            )
    return meta


def claim_output(root: Path, overwrite: bool) -> None:
    """Make `root` ready for a new prepare-data run without touching anyone else's files.

    A missing or empty folder is fine. A folder of our own output (only our file names, and a
    meta.json or .incomplete marker) is cleared: an interrupted run's freely, a finished one only with
    `overwrite`; one that a live prepare-data is still writing, never. Anything else is refused. The marker is written first and meta.json removed first,
    so a half-replaced folder never reads as finished.
    """
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {str(root)!r} is a file; give a folder (new or empty)")
    root.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in root.iterdir()}
    if names:
        foreign = sorted(n for n in names if n not in OWN_NAMES and not OWN_FILE.match(n))
        if foreign or not names & {META, INCOMPLETE}:
            what = f"{foreign[0]!r}" if foreign else "files"
            raise ConfigError(
                f"--out {str(root)!r} is not empty and holds {what} that prepare-data did not write; "
                "give a new or empty folder"
            )
        if META in names and not overwrite:
            raise ConfigError(f"--out {str(root)!r} already holds prepared data; pass --overwrite to replace it")
        if INCOMPLETE in names and (pid := _writer_alive(root / INCOMPLETE)):
            raise ConfigError(
                f"--out {str(root)!r} is being written by prepare-data (pid {pid}); wait for it or stop it "
                f"(if pid {pid} is not prepare-data, delete {root / INCOMPLETE})"
            )
    (root / INCOMPLETE).write_text(f"prepare-data (pid {os.getpid()}) is writing this folder\n")
    for name in sorted(names - {INCOMPLETE}, key=lambda n: n != META):
        (root / name).unlink()


def _writer_alive(marker: Path) -> int | None:
    """The pid that a .incomplete marker names, if that process still runs (and is not this one)."""
    found = re.search(r"pid (\d+)", marker.read_text(errors="replace"))
    if not found or int(found.group(1)) == os.getpid():
        return None
    try:
        os.kill(int(found.group(1)), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None  # the run that wrote it is gone: an interrupted run, whose leftovers are ours to clear
    except PermissionError:
        pass  # it exists, under another user
    return int(found.group(1))


def write_meta(root: Path, meta: dict[str, Any]) -> None:
    """Write meta.json atomically (after the shards are on disk), then drop the .incomplete marker."""
    tmp = root / f"{META}.tmp"
    with tmp.open("w") as f:
        json.dump({"format": FORMAT, "version": VERSION, **meta}, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / META)
    (root / INCOMPLETE).unlink()


def has_val_split(cfg: DataConfig) -> bool:
    """Whether build_dataset(..., split="val") has sequences to give: data.val_fraction > 0, or, for
    source = tokens, prepared data with a validation split (its data.val_fraction is 0)."""
    if cfg.source == "tokens":
        return read_meta(Path(cfg.path))["splits"]["val"]["tokens"] > 0
    return cfg.val_fraction > 0
