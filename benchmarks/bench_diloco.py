"""DiLoCo (parallel.diloco, notes/diloco-design.md) against data parallelism and torchft, in one run.

Every meshtrain contender trains the README model (configs/default.toml) on its corpus through
`meshtrain train` (common.train_default); the peer, torchft 0.2.0's DiLoCo, trains the same model on
the same data with the same hyperparameters (benchmarks/diloco_peer.py says how each is matched).

1. Loss at equal tokens (--steps steps of training.global_batch sequences, 4 ranks unless said):
   DP; DiLoCo 2 islands x 2 ranks with H = diloco.inner_steps in --inner-steps (default 10 and 50);
   one island alone (2 ranks, half the global batch: half the tokens); torchft's DiLoCo 2 x 2 at the
   same H. Final loss: the validation loss after the last step (data.val_fraction=0.05, the first
   128 sequences of the split for everyone: eval_batches x global_batch; H divides --steps, so the
   DiLoCo runs end on a sync and are evaluated at the global weights).
   Bytes over the run between the two halves (ranks 0-1 = island/pseudo-node 0, parallel.node_size=2):
   DiLoCo's comm_outer_wire_bytes summed over island 0's ranks, DP's comm_inter_node_bytes summed
   over ranks 0-1, torchft's all-reduce wire bytes from group 0 (diloco_peer.py). Ring model: DP's
   4-rank ring sends 2(4-1)/4 = 1.5 x the parameters' fp32 bytes P off pseudo-node 0 per step; DiLoCo
   sends 2(2-1)/2 = 1 x P per sync (each of the island's 2 replica ranks one half), so DP / DiLoCo =
   1.5 H in theory (H x per all-reduced byte); int8 (diloco.pseudo_grad_dtype=int8) a further ~4x.
2. Utilization over a slow link (--util-steps steps, [comm] emulate_gbps=--gbps, emulate_latency_ms
   =--latency-ms, emulate_scope=inter-node, node_size=2: the islands are two pseudo-nodes): wall time
   (the sum of rank 0's step times) and compute utilization of DP, DiLoCo, streaming DiLoCo
   (diloco.fragments=2) and overlapped DiLoCo (diloco.overlap=true), all at H = --util-h, beside DP
   without the link. Utilization: DiLoCo's own compute_utilization (the last record's, cumulative:
   1 - outer wait / wall, the wait including one island's for the other), and for every contender
   alike the wall time of DP without the link in the same round over this contender's.

Contenders run in an order shuffled afresh per round (part 1: one round, since every run from one
seed trains the same steps -- repeats would repeat the figures; part 2: --util-rounds rounds, the
spread min - max reported). Output: a table, --json, --raw (the measured figures, which --loss-from
takes back to rerun part 2 alone), and with --plot a figure of loss vs step.

    python benchmarks/bench_diloco.py [--steps 200] [--inner-steps 10,50] [--util-steps 40] [--plot docs/img/diloco_loss.png]

On 2 shared cores the defaults take 25 - 30 minutes (17 runs of `meshtrain train` or the peer, each
~35 s of start-up); 200 steps and H <= 50 are far shorter than the DiLoCo paper's runs (H = 500).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import ROOT, train_default
from diloco_peer import run_peer

ISLANDS = 2


def _final_loss(recs: list[dict]) -> float:
    """The validation loss of the last evaluation (the last step); the last 10 steps' mean training loss without one."""
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    return vals[-1] if vals else statistics.mean(r["loss"] for r in recs[-10:])


def _sum(records: list[list[dict]], ranks: range, key: str) -> float:
    return sum(r.get(key, 0) for rank in ranks for r in records[rank])


def loss_at_equal_tokens(root: Path, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    s = args.steps
    base = [
        f"training.steps={s}",
        f"training.warmup_steps={args.warmup}",
        "data.val_fraction=0.05",
        f"training.eval_interval={s}",
        "parallel.node_size=2",
    ]
    gb = 16  # configs/default.toml's training.global_batch
    eval_seqs = 128  # the same validation sequences for every contender
    ours: dict[str, tuple[int, list[str]]] = {"DP": (4, [f"training.eval_batches={eval_seqs // gb}"])}
    for h in args.inner_steps:
        # an island evaluates batches of its share of the global batch (gb / K): twice the batches, the same sequences
        diloco = [
            f"parallel.diloco={ISLANDS}",
            f"diloco.inner_steps={h}",
            f"training.eval_batches={eval_seqs * ISLANDS // gb}",
        ]
        ours[f"DiLoCo H={h}"] = (4, diloco)
        if h == args.inner_steps[0]:
            ours[f"DiLoCo H={h} int8"] = (4, [*diloco, "diloco.pseudo_grad_dtype=int8"])
    half = gb // ISLANDS
    ours["one island"] = (2, [f"training.global_batch={half}", f"training.eval_batches={eval_seqs // half}"])
    peers = {f"torchft H={h}": h for h in args.peer_h}
    order = [*ours, *peers]
    rng.shuffle(order)
    out: dict[str, Any] = {"order": order, "runs": {}}
    for name in order:
        print(f"  part 1: {name}", flush=True)
        if name in peers:
            peer_over = [*base[:4], f"training.eval_batches={eval_seqs // gb}"]
            res = run_peer([*peer_over, *args.set], peers[name], root / name.replace(" ", "_"))
            out["runs"][name] = {
                "final_loss": res["val_loss"],
                "outer_bytes": res["outer_wire_bytes"],
                "syncs": res["syncs"],
                "losses": [r["loss"] for r in res["records"]],
                "wall_s": res["wall_s"],
            }
            continue
        nproc, extra = ours[name]
        recs = train_default(root / name.replace(" ", "_"), nproc, [*base, *extra, *args.set])
        island0 = range(min(nproc, 2))  # island 0 = pseudo-node 0 = ranks 0 and 1
        out["runs"][name] = {
            "final_loss": _final_loss(recs[0]),
            "outer_bytes": _sum(recs, island0, "comm_outer_wire_bytes"),
            "inter_node_bytes": _sum(recs, island0, "comm_inter_node_bytes"),
            "syncs": sum(1 for r in recs[0] if r.get("outer_fragment", -1) >= 0),
            "losses": [r["loss"] for r in recs[0]],
            "step_time_s": statistics.median(r["step_time_s"] for r in recs[0][5:]),
            "wall_s": sum(r["step_time_s"] for r in recs[0]),
        }
    return out


NO_LINK = "DP, no link"


def utilization(root: Path, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    steps = [f"training.steps={args.util_steps}", "training.warmup_steps=5", "parallel.node_size=2"]
    link = [
        *steps,
        f"comm.emulate_gbps={args.gbps}",
        f"comm.emulate_latency_ms={args.latency_ms}",
        "comm.emulate_scope=inter-node",
    ]
    diloco = [*link, f"parallel.diloco={ISLANDS}", f"diloco.inner_steps={args.util_h}"]
    contenders = {
        NO_LINK: steps,  # the baseline: the same steps' compute and in-node traffic, measured in the same round
        "DP": link,
        "DiLoCo": diloco,
        "streaming DiLoCo (F=2)": [*diloco, "diloco.fragments=2"],
        "overlapped DiLoCo": [*diloco, "diloco.overlap=true"],
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in contenders}
    for r in range(args.util_rounds):
        order = list(contenders)
        rng.shuffle(order)
        for name in order:
            print(f"  part 2, round {r + 1}: {name}", flush=True)
            run_dir = root / f"util-{r}-{name.replace(' ', '_').replace(',', '')}"
            recs = train_default(run_dir, 4, [*contenders[name], *args.set])
            rank0 = recs[0]
            wall = sum(x["step_time_s"] for x in rank0)
            wait = sum(x.get("outer_wait_s", 0.0) for x in rank0)
            runs[name].append(
                {
                    "wall_s": wall,
                    "step_time_s": statistics.median(x["step_time_s"] for x in rank0[2:]),
                    "outer_wait_s": wait,
                    "compute_utilization": rank0[-1].get("compute_utilization", 1 - wait / wall),
                    "final_loss": statistics.mean(x["loss"] for x in rank0[-10:]),
                }
            )
    return {"runs": runs, "order_seed": args.seed}


def _spread(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) < 2:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)} - {format(max(values), fmt)})"


def _display(runs: dict[str, Any]) -> dict[str, Any]:
    """The runs in a fixed order (they ran shuffled): DP, ours by H, one island, torchft by H."""

    def key(name: str) -> tuple[int, int, str]:
        h = int(name.split("H=")[1].split()[0]) if "H=" in name else 0
        return ({"DP": 0, "DiLoCo": 1, "one": 2, "torchft": 3}[name.split()[0]], h, name)

    return {name: runs[name] for name in sorted(runs, key=key)}


def plot(path: Path, runs: dict[str, Any], steps: int) -> None:
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def smooth(xs: list[float], w: int = 10) -> list[float]:
        return [statistics.mean(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {"DP": "black", "one island": "gray"}
    for name, run in _display(runs).items():
        if "int8" in name:
            continue
        h = name.split("H=")[1] if "H=" in name else ""
        color = colors.get(name) or colors.setdefault(f"H={h}", f"C{len(colors) - 2}")
        style = "--" if name.startswith("torchft") else "-"
        ax.plot(range(1, len(run["losses"]) + 1), smooth(run["losses"]), style, color=color, label=name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (island 0's for DiLoCo; mean of 10 steps)")
    ax.set_title(f"DiLoCo vs DP, configs/default.toml, {steps} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(p1: dict[str, Any], p2: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The figures as markdown lines (printed, and pasted into benchmarks/results.md)."""
    runs = _display(p1["runs"])
    dp = runs["DP"]
    lines = [
        f"Loss at equal tokens: {args.steps} steps x 16 sequences x 128 tokens, 4 ranks (one island: 2 ranks, "
        "8 sequences a step); validation loss after the last step on the same 128 held-out sequences.",
        "",
        "| run | final val loss | vs DP | bytes between the halves | DP bytes / these | syncs | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    dp_bytes = dp["inter_node_bytes"]
    for name, run in runs.items():
        vs = (run["final_loss"] - dp["final_loss"]) / dp["final_loss"]
        nbytes = dp_bytes if name == "DP" else run["outer_bytes"] if "one island" not in name else 0
        ratio = f"{dp_bytes / nbytes:.1f}x" if nbytes and name != "DP" else "-"
        lines.append(
            f"| {name} | {run['final_loss']:.4f} | {vs:+.2%} | {nbytes:,.0f} | {ratio} | {run.get('syncs', '-')} | "
            f"{run['wall_s']:.0f} |"
        )
    lines.append("")
    one = runs["one island"]["final_loss"]
    for h in args.inner_steps:
        name = f"DiLoCo H={h}"
        if name not in runs:
            continue
        run = runs[name]
        vs = (run["final_loss"] - dp["final_loss"]) / dp["final_loss"]
        less = dp_bytes / run["outer_bytes"] if run["outer_bytes"] else float("nan")
        lines.append(
            f"- {name}: {vs:+.2%} vs DP (target within 3%: {'met' if abs(vs) <= 0.03 else 'missed'}), "
            f"{'better' if run['final_loss'] < one else 'worse'} than one island alone ({one:.4f}); "
            f"DP sends {less:.1f}x its bytes (ring-model expectation 1.5 H = {1.5 * h:g}x; per all-reduced byte "
            f"{less / 1.5:.1f}x vs H = {h})"
        )
        peer = runs.get(f"torchft H={h}")
        if peer:
            pvs = (run["final_loss"] - peer["final_loss"]) / peer["final_loss"]
            lines.append(
                f"  - vs torchft's DiLoCo at H={h}: loss {run['final_loss']:.4f} vs {peer['final_loss']:.4f} "
                f"({pvs:+.2%}); bytes ours / torchft {run['outer_bytes'] / peer['outer_bytes']:.3f} "
                f"(torchft all-reduces the whole model from each of the group's 2 ranks); training time torchft / ours "
                f"{peer['wall_s'] / run['wall_s']:.2f}x"
            )
        int8 = runs.get(f"{name} int8")
        if int8 and int8["outer_bytes"]:
            ivs = (int8["final_loss"] - run["final_loss"]) / run["final_loss"]
            lines.append(
                f"  - int8 pseudo-gradients: {run['outer_bytes'] / int8['outer_bytes']:.2f}x fewer bytes than fp32 "
                f"(expect ~4x less the per-block scales), loss {int8['final_loss']:.4f} ({ivs:+.2%} vs fp32)"
            )
    lines += [
        "",
        f"Over a slow link ({args.gbps:g} Gbit/s + {args.latency_ms:g} ms between the two pseudo-nodes, "
        f"{args.util_steps} steps, H = {args.util_h}, {args.util_rounds} round(s), median (min - max)): wall = the sum "
        "of rank 0's step times (outer waits included); utilization vs no link = the wall time of the same steps of DP "
        "without the link, in the same round, over this wall time.",
        "",
        "| run | wall s | median step s | compute_utilization (records) | utilization vs no link | DP wall / this |",
        "|---|---|---|---|---|---|",
    ]
    dp_wall = statistics.median(x["wall_s"] for x in p2["runs"]["DP"])
    free = [x["wall_s"] for x in p2["runs"][NO_LINK]]
    for name, rounds in p2["runs"].items():
        walls = [x["wall_s"] for x in rounds]
        cu = [x["compute_utilization"] for x in rounds] if "DiLoCo" in name else []
        util = [f / x["wall_s"] for f, x in zip(free, rounds)]
        lines.append(
            f"| {name} | {_spread(walls, '.1f')} | {_spread([x['step_time_s'] for x in rounds], '.3f')} | "
            f"{_spread(cu, '.1%') if cu else '-'} | {_spread(util, '.1%')} | {dp_wall / statistics.median(walls):.2f}x |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps of part 1 (every H must divide it)")
    p.add_argument("--warmup", type=int, default=20, help="training.warmup_steps of part 1")
    p.add_argument("--inner-steps", default="10,50", help="H values of part 1 (the first also runs int8)")
    p.add_argument("--peer-h", default="10,50", help="H values torchft's DiLoCo runs at (empty: no peer)")
    p.add_argument("--util-steps", type=int, default=40, help="training steps of part 2")
    p.add_argument("--util-h", type=int, default=10, help="H of part 2")
    p.add_argument("--util-rounds", type=int, default=2, help="runs of each part 2 contender, in shuffled order")
    p.add_argument("--gbps", type=float, default=0.1, help="the emulated inter-node bandwidth, Gbit/s")
    p.add_argument("--latency-ms", type=float, default=50.0, help="the emulated link's latency per collective")
    p.add_argument("--seed", type=int, default=0, help="shuffles the order of the contenders")
    p.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    p.add_argument("--plot", help="write the loss-vs-step figure here (PNG)")
    p.add_argument("--json", help="append the figures to this file")
    p.add_argument("--raw", help="write the measured figures here (JSON) before the report")
    p.add_argument("--loss-from", help="take part 1's figures from this --raw file instead of measuring them")
    args = p.parse_args()
    args.inner_steps = [int(h) for h in args.inner_steps.split(",") if h]
    args.peer_h = [int(h) for h in args.peer_h.split(",") if h]
    for h in {*args.inner_steps, *args.peer_h}:
        if args.steps % h:
            raise SystemExit(f"H={h} must divide --steps {args.steps} (the runs end on a sync)")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.loss_from:  # part 1's figures from an earlier --raw file: rerun part 2 alone
            p1 = json.loads(Path(args.loss_from).read_text())["loss"]
            rng.shuffle(list(p1["runs"]))  # the same part 2 order as a full run with this seed
        else:
            p1 = loss_at_equal_tokens(Path(tmp), args, rng)
        p2 = utilization(Path(tmp), args, rng)
    if args.raw:  # the figures before any rendering, so that a report can be redone from them
        Path(args.raw).write_text(json.dumps({"loss": p1, "utilization": p2}))
    lines = report(p1, p2, args)
    print("\n".join(lines))
    if args.plot:
        plot(Path(args.plot) if Path(args.plot).is_absolute() else ROOT / args.plot, p1["runs"], args.steps)
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"benchmark": "diloco", "loss": p1, "utilization": p2, "report": lines}) + "\n")


if __name__ == "__main__":
    main()
