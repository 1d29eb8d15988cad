"""`meshtrain export-hf`: a run's checkpoint, of any layout, as a Hugging Face model folder."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from meshtrain.config import ConfigError
from meshtrain.hf.config import write_hf_config
from meshtrain.hf.weights import save_hf_weights

DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}
UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-hf",
        help="write a run's checkpoint as a Hugging Face model folder (transformers loads it)",
        description="Load the newest checkpoint of RUN_DIR (or --step N's), whatever layout wrote it, and "
        "write OUT/config.json (LlamaForCausalLM, or MixtralForCausalLM for a mixture of experts), the "
        "weights as safetensors (sharded, with an index, above --max-shard-size) and, when the run used a "
        "tokenizer.json, the tokenizer files.",
    )
    p.add_argument("--run-dir", required=True, help="folder of a `meshtrain train` run")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest)")
    p.add_argument("--out", required=True, help="a new (or empty) folder to write; nothing is ever overwritten")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights (fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 500MB (default 5GB)")
    p.set_defaults(func=run)


def parse_size(text: str) -> int:
    number, unit = text[:-2], text[-2:].upper()
    if unit not in UNITS or not number.replace(".", "", 1).isdigit() or float(number) <= 0:
        raise ConfigError(f"--max-shard-size {text!r}: write a size such as 500MB or 5GB (units KB, MB, GB)")
    return int(float(number) * UNITS[unit])


def run(args: argparse.Namespace) -> int:
    from meshtrain.generate import load_checkpoint_model

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; choose a new one (nothing is overwritten)")
    max_bytes = parse_size(args.max_shard_size)
    model, cfg, step = load_checkpoint_model(Path(args.run_dir), args.step)
    dtype, dtype_name = DTYPES[args.dtype]
    hf_config = write_hf_config(cfg.model, dtype_name)  # refuses what transformers cannot compute, first
    # Written beside OUT, then renamed into place: an interrupted export leaves no half a model in OUT.
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir(parents=True)
    files = save_hf_weights(dict(model.named_parameters()), tmp, dtype, max_bytes)
    tokenizer = Path(cfg.data.tokenizer)
    if cfg.data.tokenizer != "byte" and tokenizer.is_file():
        shutil.copy(tokenizer, tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
        files += ["tokenizer.json", "tokenizer_config.json"]
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    if out.exists():
        out.rmdir()  # checked empty above
    tmp.rename(out)
    note = "" if cfg.data.tokenizer != "byte" else " (the byte tokenizer has no Hugging Face file: none written)"
    print(f"# {args.run_dir} @ step {step} -> {out}: config.json, {', '.join(files)}{note}", file=sys.stderr)
    return 0
