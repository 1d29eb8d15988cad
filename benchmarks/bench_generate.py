"""Generation speed with and without the KV cache, on the README model (configs/default.toml).

One process, no collectives: a 64-token prompt, then 256 new tokens sampled as `meshtrain generate`
samples them by default (temperature 0.8, top-k 40, the same seed for both, and the byte tokenizer
has no end-of-text token, so both generate every token). The default model's window is 256 tokens,
so a run passes it: the uncached path then slides its window by a token each step, the cached one
refills 3/4 of it every 64 tokens (docs/generation.md). Each round times both, in an order shuffled
afresh per round; the ratio is computed per round and reported as median (min - max).

    python benchmarks/bench_generate.py [--rounds 7] [--prompt-tokens 64] [--new-tokens 256]
                                        [--run-dir DIR] [--threads 1] [--json FILE]

Without --run-dir the model is randomly initialised (the speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

from common import ROOT, Ratio, bench_model_config, record
from meshtrain.data.tokenizer import ByteTokenizer, Tokenizer
from meshtrain.generate import Sampling, generate, load_for_generation
from meshtrain.model import Llama, build_model

CONTENDERS = {"kv cache": True, "no kv cache": False}


def _prompt(n_tokens: int) -> str:
    """The first n_tokens bytes of a Python source file: text of the kind the default model trains on."""
    return (ROOT / "src" / "meshtrain" / "generate.py").read_bytes()[:n_tokens].decode("ascii")


def _seconds(model: Llama, tok: Tokenizer, prompt: str, new_tokens: int, kv_cache: bool) -> float:
    out = generate(model, tok, prompt, new_tokens, torch.device("cpu"), Sampling(seed=1), kv_cache=kv_cache)
    if out.new_tokens != new_tokens:
        raise RuntimeError(f"generated {out.new_tokens} tokens, not {new_tokens} ({out.stopped})")
    return out.seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="timing rounds; each runs both contenders, shuffled")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens (bytes)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per run")
    p.add_argument("--run-dir", help="sample from this run's newest checkpoint instead of a random model")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: a one-token decode step is too small to share, and on a busy "
        "machine a thread pool's hand-offs cost more than the arithmetic)",
    )
    p.add_argument("--json", help="append the ratio to this file (one JSON object per line)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.run_dir:
        model, tok, _ = load_for_generation(Path(args.run_dir))
    else:
        model, tok = build_model(bench_model_config(), seed=0), ByteTokenizer()
    prompt = _prompt(args.prompt_tokens)
    for kv_cache in CONTENDERS.values():  # warm-up: allocator, kernel choice
        _seconds(model, tok, prompt, 16, kv_cache)
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    order, shuffle = list(CONTENDERS), random.Random(0)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for name in order:
            times[name].append(_seconds(model, tok, prompt, args.new_tokens, CONTENDERS[name]))
    per_round = [slow / fast for fast, slow in zip(times["kv cache"], times["no kv cache"])]
    cfg, threads = model.cfg, torch.get_num_threads()
    note = (
        f"{args.prompt_tokens}-token prompt + {args.new_tokens} new, window {cfg.max_seq_len}; "
        f"dim {cfg.dim}, {cfg.n_layers} layers, {threads} thread{'s' if threads != 1 else ''}"
    )
    rate = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
    row = Ratio(
        "generation",
        "kv cache",
        "no kv cache",
        statistics.median(per_round),
        min(per_round),
        max(per_round),
        rate["kv cache"],
        rate["no kv cache"],
        note,
    )
    record(args, [row])
    for name, t in times.items():
        spread = f"{args.new_tokens / max(t):,.0f} - {args.new_tokens / min(t):,.0f}"
        print(f"  {name}: {rate[name]:,.0f} tokens/s median over {args.rounds} rounds ({spread})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
