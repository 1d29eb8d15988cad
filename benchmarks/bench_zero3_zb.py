"""ZeRO-3 under the zero-bubble schedules: what it costs next to ZeRO-3 + 1F1B and ZeRO-1 + ZB-H1.

pp 2 x dp_shard 2 on 4 gloo ranks, the README's model (configs/default.toml) on synthetic tokens,
`--micro` microbatches of one sequence per step. Each contender is a `meshtrain train` launch; every
round launches each once, in an order shuffled afresh per round. Printed per contender, for each
pipeline stage (ranks 0 and 2): bytes handed to all-gather and reduce-scatter per step (counted by
meshtrain, exact), model states, the peak of gathered ZeRO-3 units, the activation peak in
microbatches, the process's peak RSS; then the median step time and its ratio to ZeRO-3 + 1F1B,
round by round (median, min, max). Under the other options for W, the same run would move and hold:
re-gathering each unit for W adds one gather of the stage per microbatch; keeping units gathered
until W holds every block whose W is pending, i.e. the whole stage, instead of two units.
    python benchmarks/bench_zero3_zb.py [--rounds 3] [--steps 6] [--micro 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

from common import train_default

CONTENDERS = {
    "ZeRO-3 + 1F1B": ["parallel.zero_stage=3", "parallel.pp_schedule=1f1b"],
    "ZeRO-3 + ZB-H1": ["parallel.zero_stage=3", "parallel.pp_schedule=zb-h1"],
    "ZeRO-3 + ZB-H2": ["parallel.zero_stage=3", "parallel.pp_schedule=zb-h2"],
    "ZeRO-1 + ZB-H1": ["parallel.zero_stage=1", "parallel.pp_schedule=zb-h1"],
}
PEER = "ZeRO-3 + 1F1B"
KEYS = (
    "comm_all_gather_bytes",
    "comm_reduce_scatter_bytes",
    "mem_model_state_bytes",
    "zero3_peak_gathered_bytes",
    "pp_peak_inflight",
    "peak_rss_bytes",
)


def _kib(x: float) -> str:
    return f"{x / 1024:,.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per launch; the first two are warm-up")
    p.add_argument("--micro", type=int, default=8, help="microbatches per step")
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    base = ["parallel.pp=2", "training.micro_batch=1", f"training.global_batch={2 * args.micro}"]
    base += [f"training.seq_len={args.seq}", f"training.steps={args.steps}", "data.source=synthetic"]
    base += ["training.warmup_steps=1", "logging.log_interval=1"]
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    last: dict[str, list[list[dict]]] = {}
    order, shuffle = list(CONTENDERS), random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            shuffle.shuffle(order)
            for name in order:
                recs = train_default(Path(tmp) / f"{r}-{len(times[name])}", 4, [*base, *CONTENDERS[name]])
                times[name].append(statistics.median(rec["step_time_s"] for rec in recs[0][2:]))
                last[name] = recs
    print(f"pp2 x dp_shard2, {args.micro} microbatches x {args.seq} tokens, default model; KiB per step / held")
    print("contender        stage  all-gather  reduce-scatter  model states  gathered peak  in flight  peak RSS MiB")
    for name, recs in last.items():
        for stage, rank in ((0, 0), (1, 2)):
            rec = recs[rank][-1]
            ag, rs, ms, peak, fl, rss = (rec.get(k, 0) for k in KEYS)
            print(
                f"{name:16} {stage:5}  {_kib(ag):>10}  {_kib(rs):>14}  {_kib(ms):>12}  {_kib(peak):>13}  "
                f"{fl:9.2f}  {rss / 2**20:12.0f}"
            )
    for name, t in times.items():
        per_round = [peer / ours for ours, peer in zip(t, times[PEER])]
        print(
            f"{name}: {statistics.median(t) * 1e3:.0f} ms/step median; {PEER} / it: "
            f"{statistics.median(per_round):.3f}x (min {min(per_round):.3f}, max {max(per_round):.3f})"
        )


if __name__ == "__main__":
    main()
