"""Context parallelism on 2 gloo ranks: our ring attention against torch's, long context, balance.

1. Attention forward: meshtrain's ring (zigzag) against torch's private `_templated_ring_attention`
   (the CPU flash op, causal load balancing on, which shards the sequence as zigzag does), with
   its default all-gather rotater and with the all-to-all one; same local shards. Time ratio per
   round, and the largest output difference (from each other and from one device's SDPA).
2. Long context: the README model at seq_len 8192 (or --long-seq), one sequence per micro-step.
   cp = 1: each rank holds whole sequences; cp = 2: each rank holds half of every sequence and
   runs two micro-steps, so that both layouts do the same work per step. Bytes saved for backward
   per rank (saved-tensor hooks: the activation peak, at the end of the forward) and step time.
3. Balance: the attention kernels' time on each rank (torch.profiler: the flash op and its
   backward), zigzag against contiguous; max over mean across ranks.

    python benchmarks/bench_cp.py [--rounds 7] [--seq 4096] [--long-seq 8192]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor.experimental._context_parallel import _attention as torch_cp

from common import Ratio, bench_model_config, bench_parser, ratio, record, spawn, timed_rounds
from meshtrain.accounting import CommStats
from meshtrain.context_parallel import ContextParallel, apply_context_parallel, shard_indices
from meshtrain.model import build_model

FLASH = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> tuple[torch.Tensor, ...]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal)


def _qkv(args: argparse.Namespace, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return tuple(torch.randn(1, args.heads, args.seq, args.head_dim, requires_grad=requires_grad) for _ in range(3))


def attention_forward(rank: int, world: int, args: argparse.Namespace) -> list[Ratio]:
    q, k, v = _qkv(args)
    idx = shard_indices(args.seq, world, rank, zigzag=True)
    mine = [t[:, :, idx].contiguous() for t in (q, k, v)]
    ours = ContextParallel(dist.group.WORLD, world, rank, "ring", True, CommStats())
    methods = {"allgather": torch_cp._RotateMethod.ALL_GATHER, "alltoall": torch_cp._RotateMethod.ALL_TO_ALL}

    def theirs(method: str) -> torch.Tensor:
        torch_cp._cp_options.enable_load_balance = True
        torch_cp._cp_options.rotate_method = methods[method]
        return torch_cp._templated_ring_attention(dist.group.WORLD, 2, _flash, *mine, is_causal=True)[0]

    with torch.no_grad():
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, idx]
        a, b = ours.attention(*mine), theirs("allgather")
        diffs = [float((a - b).abs().max()), float((a - want).abs().max()), float((b - want).abs().max())]
        contenders = {
            "meshtrain ring": lambda: ours.attention(*mine),
            "torch ring (all-gather rotater, default)": lambda: theirs("allgather"),
            "torch ring (all-to-all rotater)": lambda: theirs("alltoall"),
        }
        timings = timed_rounds(contenders, args.rounds, args.steps)
    tokens = args.seq // world
    note = f"max abs(ours - torch) {diffs[0]:.1e}; vs one device: ours {diffs[1]:.1e}, torch {diffs[2]:.1e}"
    shape = f"b 1, {args.heads} heads, seq {args.seq}, head_dim {args.head_dim}, fp32"
    return [
        ratio(f"cp attention forward ({shape})", timings, "meshtrain ring", peer, tokens, note)
        for peer in list(contenders)[1:]
    ]


def _saved_bytes(model: torch.nn.Module, run: object) -> int:
    """Distinct storages autograd saves during `run()` (parameters excluded): the activation peak."""
    static = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in static:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()  # type: ignore[operator]
    loss.backward()
    return sum(seen.values())


def long_context(rank: int, world: int, args: argparse.Namespace) -> tuple[Ratio, dict[int, int]]:
    cfg = dataclasses.replace(bench_model_config(), max_seq_len=args.long_seq)
    s = args.long_seq
    torch.manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (2, s + 1))  # the step's two sequences, on every rank
    plain, ring = build_model(cfg, seed=0), build_model(cfg, seed=0)
    apply_context_parallel([ring], dist.group.WORLD, "ring", "zigzag", CommStats())
    idx = shard_indices(s, world, rank, zigzag=True)

    def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x, pos).flatten(0, 1), y.flatten(), reduction="sum")

    def cp1() -> torch.Tensor:  # this rank's own sequence, whole
        return loss(plain, data[rank : rank + 1, :-1], data[rank : rank + 1, 1:], torch.arange(s))

    def cp2_micro(i: int) -> torch.Tensor:  # this rank's half of sequence i
        return loss(ring, data[i : i + 1, :-1][:, idx], data[i : i + 1, 1:][:, idx], idx)

    saved = {1: _saved_bytes(plain, cp1), 2: _saved_bytes(ring, lambda: cp2_micro(0))}
    contenders = {"cp=2": lambda: [cp2_micro(i).backward() for i in range(2)], "cp=1": lambda: cp1().backward()}
    timings = timed_rounds(contenders, max(3, args.rounds // 2), 1)
    note = f"saved for backward per rank: cp=1 {saved[1] / 2**20:.0f} MiB, cp=2 {saved[2] / 2**20:.0f} MiB"
    return ratio(f"long context, seq {s}, 2 sequences per step", timings, "cp=2", "cp=1", 2 * s, note), saved


def balance(rank: int, world: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds in the flash kernels per rank (forward + backward), median over rounds."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = _qkv(args)
    out: dict[str, list[float]] = {}
    for zigzag in (True, False):
        idx = shard_indices(args.seq, world, rank, zigzag)
        cp = ContextParallel(dist.group.WORLD, world, rank, "ring", zigzag, CommStats())
        per_round = []
        for _ in range(args.rounds):
            leaves = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                cp.attention(*leaves).sum().backward()
            per_round.append(sum(e.cpu_time_total for e in prof.key_averages() if e.key in FLASH) / 1e6)
        mine = torch.tensor([statistics.median(per_round)], dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        out["zigzag" if zigzag else "contiguous"] = [float(t) for t in every]
    return out


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    rows = attention_forward(rank, world, args)
    long_row, saved = long_context(rank, world, args)
    seconds = balance(rank, world, args)
    if rank == 0:
        print(f"ring attention on {world} gloo ranks, {args.rounds} rounds, contenders shuffled per round")
        spread = {name: max(t) / (sum(t) / len(t)) for name, t in seconds.items()}
        for name, t in seconds.items():
            print(
                f"  {name}: flash-kernel seconds per rank {', '.join(f'{x:.3f}' for x in t)} (max/mean {spread[name]:.2f})"
            )
        print(f"  long context: saved activations cp=2 / cp=1 = {saved[2] / saved[1]:.3f} per rank")
        long_row.note += f"; balance (flash-kernel time max/mean): zigzag {spread['zigzag']:.2f}, contiguous {spread['contiguous']:.2f}"
        record(args, [*rows, long_row])


def main() -> None:
    p = bench_parser(__doc__, steps=3)
    p.set_defaults(seq=4096)
    p.add_argument("--heads", type=int, default=8, help="attention heads of the op benchmark")
    p.add_argument("--head-dim", type=int, default=32, help="head dimension of the op benchmark")
    p.add_argument("--long-seq", type=int, default=8192, help="sequence length of the long-context run")
    spawn(worker, 2, p.parse_args())


if __name__ == "__main__":
    main()
