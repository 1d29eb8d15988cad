"""Checks of what a run will read and where it will write, before any process is spawned.

`validate` checks the config against itself; this checks it against the machine: the corpus exists
and holds text, the tokenizer loads and fits the model's vocabulary, a requested GPU is there, the
run folder can be written and holds no run that this start would lose. Each problem is one
ConfigError line; warnings (more ranks than cores) come back as strings.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from meshtrain.config import Config, ConfigError
from meshtrain.rundir import check_run_dir


def check_data(cfg: Config) -> None:
    d = cfg.data
    if d.source == "stdlib":
        if not Path(sysconfig.get_paths()["stdlib"]).is_dir():
            raise ConfigError(
                "data.source=stdlib but this interpreter's standard library sources are missing; "
                "set data.source=files and data.path"
            )
        return
    if d.source != "files":
        return
    if not d.path:
        raise ConfigError("data.source=files needs data.path (a text file or a folder of them)")
    root = Path(d.path)
    if not root.exists():
        raise ConfigError(f"data.path={d.path!r} does not exist; point it at a text file or folder")
    exts = tuple(e.strip() for e in d.extensions.split(",") if e.strip())
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and p.suffix in exts]
    if not files:
        raise ConfigError(f"data.path={d.path!r} holds no file ending in {', '.join(exts)}; change data.extensions")
    if sum(p.stat().st_size for p in files) == 0:
        raise ConfigError(f"data.path={d.path!r}: every file ({len(files)}) is empty; there is nothing to train on")


def tokenizer_vocab(spec: str) -> int:
    """The tokenizer's vocabulary size, loading it as the workers will (one-line errors)."""
    if spec == "byte":
        return 256
    if not Path(spec).is_file():
        raise ConfigError(f"data.tokenizer={spec!r}: no such file; use 'byte' or a tokenizer.json path")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(f"data.tokenizer={spec!r} needs the tokenizers package; pip install tokenizers") from None
    try:
        return Tokenizer.from_file(spec).get_vocab_size()
    except Exception as exc:  # the library raises its own exception types for a bad file
        raise ConfigError(
            f"data.tokenizer={spec!r} is not a valid tokenizer.json ({str(exc).splitlines()[0]})"
        ) from None


def check_tokenizer(cfg: Config) -> None:
    vocab = tokenizer_vocab(cfg.data.tokenizer)
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer has {vocab} tokens but model.vocab_size={cfg.model.vocab_size}: ids past "
            f"the vocabulary would index out of range; set model.vocab_size >= {vocab}"
        )


def check_device(cfg: Config) -> None:
    if cfg.training.device != "cuda":
        return
    # asked without importing torch when the driver tools say there is no GPU at all
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists():
        raise ConfigError("training.device=cuda but no CUDA device is visible; set training.device=cpu or auto")


def preflight(cfg: Config, nproc: int, overwrite: bool) -> list[str]:
    """Raise ConfigError on the first problem; return warnings."""
    check_data(cfg)
    check_tokenizer(cfg)
    check_device(cfg)
    check_run_dir(Path(cfg.logging.run_dir), cfg.checkpoint.resume, overwrite)
    cores = os.cpu_count() or 1
    warnings = []
    if cfg.training.device != "cuda" and nproc > 2 * cores:
        warnings.append(
            f"--nproc {nproc} runs {nproc} processes on {cores} cores: each gets about {cores / nproc:.2f} "
            "of a core, steps slow down at least that much, and collectives wait on descheduled ranks"
        )
    return warnings
