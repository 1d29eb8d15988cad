"""Compressed communication under an emulated slow network, through the CLI, in one run.

Four ranks posing as 2 nodes of 2 (`parallel.node_size=2`), joined by an emulated link (`[comm]`
emulate_gbps / emulate_latency_ms, default 1 Gbit/s and 1 ms, inter-node groups only), training the
README model (configs/default.toml) on its corpus:

1. ZeRO-3 against ZeRO++ (qwZ + hpZ + qgZ): tokens/s per round and their ratio, the bytes pseudo-node
   0 sends to the other node per step (ranks 0 and 1 summed, `comm_inter_node_bytes`) against the
   ring-model theory written here, and the final losses.
2. AdamW against 1-bit Adam (plain DP, freeze at --freeze of the steps): tokens/s and ratio, wire
   bytes per step after the freeze against the fp32 all-reduce's, and the final losses.

Every contender runs --rounds times, in an order shuffled afresh per round; a ratio is taken per
round and reported as median (min - max). Final loss: the mean of the last 10 steps of the last
round (every round trains the same steps from the same seed).

    python benchmarks/bench_compress.py [--rounds 2] [--steps 60] [--gbps 1] [--latency-ms 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

from common import train_default

ZEROPP = ["parallel.zeropp_qwz=true", "parallel.zeropp_hpz=true", "parallel.zeropp_qgz=true"]


def _tokens_per_s(records: list[dict]) -> float:
    return statistics.median(r["tokens_per_s"] for r in records[5:])


def _compare(root: Path, contenders: dict[str, list[str]], args: argparse.Namespace, rng: random.Random) -> dict:
    """tokens/s per round (shuffled order), the last round's records, and ours/peer per round."""
    link = [
        "parallel.node_size=2",
        f"comm.emulate_gbps={args.gbps}",
        f"comm.emulate_latency_ms={args.latency_ms}",
        f"training.steps={args.steps}",
        "training.warmup_steps=5",
    ]
    speed: dict[str, list[float]] = {k: [] for k in contenders}
    last: dict[str, list[list[dict]]] = {}
    for r in range(args.rounds):
        order = list(contenders)
        rng.shuffle(order)
        for name in order:
            last[name] = train_default(root / f"{name}-{r}", 4, [*link, *contenders[name]])
            speed[name].append(_tokens_per_s(last[name][0]))
    peer, ours = list(contenders)
    ratios = [a / b for a, b in zip(speed[ours], speed[peer])]
    return {
        "tokens_per_s": {k: statistics.median(v) for k, v in speed.items()},
        "ratio": (statistics.median(ratios), min(ratios), max(ratios)),
        "final_loss": {k: statistics.mean(r["loss"] for r in recs[0][-10:]) for k, recs in last.items()},
        "records": last,
    }


def _node0(records: list[list[dict]], key: str) -> float:
    """Per step (the median over steps) of ranks 0 and 1 summed: pseudo-node 0."""
    return statistics.median(a[key] + b[key] for a, b in zip(records[0], records[1]))


def zero_pp(root: Path, args: argparse.Namespace, rng: random.Random) -> dict:
    out = _compare(root, {"ZeRO-3": ["parallel.zero_stage=3"], "ZeRO++": ["parallel.zero_stage=3", *ZEROPP]}, args, rng)
    recs = out.pop("records")
    psi = recs["ZeRO-3"][0][0]["comm_all_gather_bytes"] / 2 / 4  # two fp32 gathers of every parameter
    block, n, k = 2048, 4, 2
    # ring model, node 0's share: 3/4 of each fp32 gather and reduce-scatter; under ZeRO++ 3/4 of the
    # forward gather's int8 codes and scales, nothing of the backward gather (hpZ), and of qgZ's
    # int4 second hop half of each of the two ranks' messages (block padding not modelled here)
    out["inter_node"] = {
        "ZeRO-3": _node0(recs["ZeRO-3"], "comm_inter_node_bytes"),
        "ZeRO++": _node0(recs["ZeRO++"], "comm_inter_node_bytes"),
    }
    out["inter_node_theory"] = {
        "ZeRO-3": 3 * (n - 1) / n * 4 * psi,
        "ZeRO++": (n - 1) / n * psi * (1 + 4 / block) + (k - 1) / k * psi / 2 * (1 + 8 / block),
    }
    out["psi"] = psi
    return out


def one_bit(root: Path, args: argparse.Namespace, rng: random.Random) -> dict:
    freeze = max(1, round(args.freeze * args.steps))
    onebit = ["optimizer.name=onebit_adam", f"optimizer.freeze_step={freeze}"]
    out = _compare(root, {"AdamW": [], "1-bit Adam": onebit}, args, rng)
    recs = out.pop("records")

    def after_freeze(name: str) -> float:  # wire bytes: the ring's 2(n-1)/n of an all-reduce against (n-1)/n
        return statistics.median(r["comm_wire_bytes"] for r in recs[name][0] if r["step"] > freeze + 1)

    out["bytes_per_step"] = {"AdamW": after_freeze("AdamW"), "1-bit Adam": after_freeze("1-bit Adam")}
    out["freeze_step"] = freeze
    return out


def _print(title: str, fig: dict, peer: str, ours: str) -> None:
    med, lo, hi = fig["ratio"]
    tps, loss = fig["tokens_per_s"], fig["final_loss"]
    print(f"{title}: {ours} / {peer} {med:.3f}x tokens/s (min {lo:.3f}, max {hi:.3f})")
    print(f"  tokens/s median: {peer} {tps[peer]:,.0f}, {ours} {tps[ours]:,.0f}")
    diff = (loss[ours] - loss[peer]) / loss[peer]
    print(f"  final loss (mean of the last 10 steps): {peer} {loss[peer]:.4f}, {ours} {loss[ours]:.4f} ({diff:+.2%})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="runs of each contender, in shuffled order")
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--gbps", type=float, default=1.0, help="the emulated inter-node bandwidth, Gbit/s")
    p.add_argument("--latency-ms", type=float, default=1.0, help="the emulated link's latency per collective")
    p.add_argument("--freeze", type=float, default=0.2, help="1-bit Adam's freeze step as a fraction of --steps")
    p.add_argument("--seed", type=int, default=0, help="shuffles the order of the contenders")
    p.add_argument("--json", help="append the figures to this file")
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        zpp = zero_pp(Path(tmp), args, rng)
        ob = one_bit(Path(tmp), args, rng)
    link = f"2 pseudo-nodes x 2 ranks, {args.gbps:g} Gbit/s + {args.latency_ms:g} ms inter-node, {args.steps} steps"
    _print(f"ZeRO++ against ZeRO-3 ({link})", zpp, "ZeRO-3", "ZeRO++")
    got, theory = zpp["inter_node"], zpp["inter_node_theory"]
    print(
        f"  inter-node bytes per step from node 0: ZeRO-3 {got['ZeRO-3']:,.0f} (theory {theory['ZeRO-3']:,.0f}), "
        f"ZeRO++ {got['ZeRO++']:,.0f} (theory {theory['ZeRO++']:,.0f}, without block padding): "
        f"{got['ZeRO-3'] / got['ZeRO++']:.2f}x less"
    )
    _print(f"1-bit Adam against AdamW (freeze at step {ob['freeze_step']})", ob, "AdamW", "1-bit Adam")
    b = ob["bytes_per_step"]
    print(
        f"  wire bytes per step and rank after the freeze: AdamW {b['AdamW']:,.0f}, 1-bit Adam {b['1-bit Adam']:,.0f} "
        f"({b['AdamW'] / b['1-bit Adam']:.1f}x less)"
    )
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"benchmark": "compress", "zeropp": zpp, "onebit": ob, "link": link}) + "\n")


if __name__ == "__main__":
    main()
