"""Mixture of experts on the README model's size class, through the CLI, in one run.

1. Expert parallelism against replicated experts, 2 ranks: the default model with 8 experts (top-2,
   256 wide) at ep = 2 and at ep = 1 (plain DP), in shuffled order over `--rounds`: tokens/s
   (median of each run's steps after the first 5) and their per-round ratio, model states per rank
   against the expert share written here (16 bytes per element, half the experts on each ep rank),
   and all-to-all bytes per step against theory (per MoE block and micro-batch: the rows out and
   back, forward and backward, tokens*top_k*dim*4 each, plus the 8*E bytes of counts).
2. MoE against dense at equal active parameters, 4 ranks as `make train` runs it: the dense model
   (SwiGLU 512 wide) against 8 experts of 256, top-2 (the same matmul parameters per token, plus the
   router), trained for the same tokens on the default corpus: final loss (mean of the last 10
   steps) and tokens/s.

    python benchmarks/bench_moe.py [--rounds 2] [--steps 30] [--train-steps 150] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

from common import train_default

MOE = ["model.n_experts=8", "model.top_k=2", "model.expert_ffn_dim=256"]


def _train(run_dir: Path, nproc: int, overrides: list[str]) -> list[dict]:
    """Rank 0's records of a default-config run, warm-up cut to 5 steps."""
    return train_default(run_dir, nproc, ["training.warmup_steps=5", *overrides])[0]


def _tokens_per_s(records: list[dict]) -> float:
    return statistics.median(r["tokens_per_s"] for r in records[5:])


def expert_parallel(root: Path, args: argparse.Namespace, rng: random.Random) -> dict[str, object]:
    base = [*MOE, f"training.steps={args.steps}", "training.global_batch=16", "training.micro_batch=4"]
    layouts = {"ep=2": ["parallel.ep=2"], "ep=1": []}
    speed: dict[str, list[float]] = {k: [] for k in layouts}
    last: dict[str, dict] = {}
    for r in range(args.rounds):
        order = list(layouts)
        rng.shuffle(order)
        for name in order:
            records = _train(root / f"{name}-{r}", 2, [*base, *layouts[name]])
            speed[name].append(_tokens_per_s(records))
            last[name] = records[-1]
    ratios = [a / b for a, b in zip(speed["ep=2"], speed["ep=1"])]
    dim, layers, seq, micro = 192, 4, 128, 4  # configs/default.toml
    expert_elements = layers * 8 * 3 * dim * 256
    per_exchange = micro * seq * 2 * dim * 4  # tokens of one micro-batch x top_k rows x dim x fp32
    micro_steps = 16 // (micro * 2)
    a2a_theory = micro_steps * layers * (4 * per_exchange + 8 * 8)
    return {
        "tokens_per_s": {k: statistics.median(v) for k, v in speed.items()},
        "ratio": (statistics.median(ratios), min(ratios), max(ratios)),
        "model_states": {k: last[k]["mem_model_state_bytes"] for k in layouts},
        "expert_share_theory": 16 * expert_elements // 2,
        "a2a_bytes": last["ep=2"]["comm_all_to_all_bytes"],
        "a2a_theory": a2a_theory,
    }


def moe_against_dense(root: Path, args: argparse.Namespace, rng: random.Random) -> dict[str, dict[str, float]]:
    contenders = {"dense": [], "moe 8x256 top-2": MOE}
    order = list(contenders)
    rng.shuffle(order)
    out = {}
    for name in order:
        records = _train(root / name.split()[0], 4, [*contenders[name], f"training.steps={args.train_steps}"])
        out[name] = {
            "final_loss": statistics.mean(r["loss"] for r in records[-10:]),
            "tokens_per_s": _tokens_per_s(records),
            "tokens_per_s_min": min(r["tokens_per_s"] for r in records[5:]),
            "tokens_per_s_max": max(r["tokens_per_s"] for r in records[5:]),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="rounds of ep=2 / ep=1, each in shuffled order")
    p.add_argument("--steps", type=int, default=30, help="steps per ep run")
    p.add_argument("--train-steps", type=int, default=150, help="steps of the MoE and the dense run")
    p.add_argument("--seed", type=int, default=0, help="shuffles the order of the contenders")
    p.add_argument("--json", help="append the figures to this file")
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ep = expert_parallel(Path(tmp), args, rng)
        quality = moe_against_dense(Path(tmp), args, rng)
    med, lo, hi = ep["ratio"]  # type: ignore[misc]
    states = ep["model_states"]
    print(
        f"expert parallelism, 2 ranks, {args.rounds} rounds: ep=2 / ep=1 {med:.3f}x tokens/s (min {lo:.3f}, max {hi:.3f})"
    )
    print(f"  tokens/s median: {ep['tokens_per_s']}")
    print(
        f"  model states per rank: ep=1 {states['ep=1']:,} B, ep=2 {states['ep=2']:,} B; saved "  # type: ignore[index]
        f"{states['ep=1'] - states['ep=2']:,} B against half the experts' {ep['expert_share_theory']:,} B"  # type: ignore[index]
    )
    print(f"  all-to-all bytes per step and rank: {ep['a2a_bytes']:,} measured, {ep['a2a_theory']:,} theory")
    for name, fig in quality.items():
        print(
            f"{name}: final loss {fig['final_loss']:.4f}, {fig['tokens_per_s']:,.0f} tokens/s "
            f"({fig['tokens_per_s_min']:,.0f} - {fig['tokens_per_s_max']:,.0f}) after {args.train_steps} steps on 4 ranks"
        )
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"benchmark": "moe", "expert_parallel": ep, "moe_vs_dense": quality}) + "\n")


if __name__ == "__main__":
    main()
