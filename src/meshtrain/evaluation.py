"""The validation loss: during training (training.eval_interval) and from a checkpoint (`meshtrain eval`).

What is evaluated: the first `training.eval_batches` global batches of the validation split, in
order (batch b holds sequences b*G .. b*G+G-1 of the split, G = training.global_batch), the same
sequences at every evaluation, so that val_loss is comparable from step to step and across layouts.
A split holding fewer than eval_batches x G sequences wraps around (some sequences count twice; the
trainer says so once). Each data-parallel rank takes its contiguous share of a global batch in
micro-batches, exactly as the training sampler does.

How: forward passes only, through the step runner's `evaluate` (meshtrain.core.runner): under
torch.no_grad(), no gradient, no optimizer state, the runner's own loss function (vocab-parallel
under tensor parallelism), pipelines on a forward-only schedule. Every rank's summed token loss is
added up by the build's `LossReduction`, as training's is, and divided by the tokens evaluated:
val_loss is the token-mean cross-entropy, val_ppl its exponential.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshtrain.data.sampler import BatchSampler


@dataclass(frozen=True)
class ValSampler(BatchSampler):
    """The validation batches: `rank_indices(b)` is this rank's share of global batch b (module docstring)."""

    def __post_init__(self) -> None:
        if self.n_sequences < 1:
            raise ValueError("the validation split holds no sequence")

    def global_indices(self, step: int) -> np.ndarray:
        return np.arange(step * self.global_batch, (step + 1) * self.global_batch) % self.n_sequences

    def wraps(self, batches: int) -> bool:
        return batches * self.global_batch > self.n_sequences


def is_eval_step(step: int, interval: int, last: int) -> bool:
    """Evaluate after `step`? Every `interval` steps and at the last one; never when interval is 0."""
    return interval > 0 and (step % interval == 0 or step == last)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


# ---- `meshtrain eval` ---------------------------------------------------------------------------------
_DESCRIPTION = """\
Load the newest checkpoint of a run on one process and print the validation loss and perplexity: the
first --batches global batches of the validation split (the run's data config, or --data's), the
same sequences and the same token-mean convention as training's val_loss.
"""


def add_parser(subparsers: Any) -> None:
    """Register the `eval` subcommand (meshtrain.cli's LAZY table)."""
    p = subparsers.add_parser(
        "eval",
        help="validation loss and perplexity of a run's newest checkpoint",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", required=True, help="folder of a `meshtrain train` run with a checkpoint")
    p.add_argument(
        "--data",
        help="evaluate on this data instead: a folder written by `meshtrain prepare-data` (data.source=tokens); "
        "its validation split is used",
    )
    p.add_argument("--batches", type=int, help="global batches to evaluate (default: the run's training.eval_batches)")
    from meshtrain.cli import add_quantize_argument

    add_quantize_argument(p)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from meshtrain.config import ConfigError

    if args.batches is not None and args.batches < 1:
        raise ConfigError(f"--batches {args.batches} must be at least 1")
    result = evaluate_checkpoint(Path(args.run_dir), args.data, args.batches, args.quantize)
    print(
        f"# {args.run_dir} @ step {result['step']}: {result['batches']} global batches x "
        f"{result['tokens'] // result['batches']:,} tokens of the validation split",
        file=sys.stderr,
    )
    print(f"val_loss {result['val_loss']:.6f}  val_ppl {result['val_ppl']:.4f}")
    if "quantized" in result:
        print(result["quantized"])
    return 0


def evaluate_checkpoint(
    run_dir: Path, data: str | None = None, batches: int | None = None, quantize: str = "none"
) -> dict[str, Any]:
    """The validation loss of the run's newest checkpoint on this process's CPU (module docstring),
    its linear layers in int8 under quantize = "int8" (LLM.int8) or "absmax" (meshtrain.model.int8)."""
    import torch

    from meshtrain.config import load_config
    from meshtrain.core.runner import Batch, ModelLoss
    from meshtrain.data import build_dataset, build_tokenizer
    from meshtrain.generate import checkpoint_path, model_at
    from meshtrain.loss import cross_entropy_sum
    from meshtrain.model.int8 import apply_quantize, describe
    from meshtrain.preflight import check_data

    path = checkpoint_path(run_dir)  # found and verified once: the model and the config come from it
    model, trained, step = model_at(path)
    report = apply_quantize(model, quantize)
    tok = build_tokenizer(trained.data.tokenizer)
    cfg = load_config(path / "config.toml", data_overrides(data))
    check_data(cfg)
    t = cfg.training
    n = batches or t.eval_batches
    val = build_dataset(cfg.data, tok, t.seq_len, t.seed, split="val")
    sampler = ValSampler(len(val), t.global_batch, t.micro_batch, 0, 1, t.seed)
    loss = ModelLoss(cross_entropy_sum, torch.device("cpu"))
    model.eval()
    total = sum(
        (loss.evaluate(model, [Batch(*val.batch(idx)) for idx in sampler.rank_indices(b)]) for b in range(n)),
        torch.zeros((), dtype=torch.float64),
    )
    tokens = n * t.global_batch * t.seq_len
    mean = float(total) / tokens
    result: dict[str, Any] = {
        "step": step,
        "batches": n,
        "tokens": tokens,
        "val_loss": mean,
        "val_ppl": perplexity(mean),
    }
    if report is not None:  # after the forwards: the line says which matmul path they took
        result["quantized"] = describe(report, model)
    return result


def data_overrides(data: str | None) -> list[str]:
    """--data as config overrides: a prepared-tokens folder (meshtrain prepare-data)."""
    return [] if data is None else ["data.source=tokens", f"data.path={data}"]
