"""Our ZeRO-3 against torch FSDP2, and our ZeRO-1/2 against our plain DP: same model, data, 2 gloo ranks.

Every contender runs in the same processes, in shuffled timing rounds. Printed per contender:
tokens/s (and the ratio to its peer), model-state bytes per rank (params + grads + optimizer state
held between steps), and bytes handed to collectives per step, next to the theory (2 psi elements
for DP and ZeRO-1/2, 3 psi for ZeRO-3). Ours are counted by CommStats; FSDP2's by a dispatch mode
that sees every c10d collective it issues (padded sizes, as sent). The peak RSS is the process's, over
all contenders; `--rss-each` re-runs each contender alone in fresh processes for its own peak.
    python benchmarks/bench_zero.py [--rounds 5] [--steps 3] [--micro-batch 8] [--seq 128] [--rss-each]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.utils._python_dispatch import TorchDispatchMode

from common import (
    Timing,
    add_compile_option,
    bench_model_config,
    bench_parser,
    compile_peer_blocks,
    ratio,
    record,
    spawn,
    timed_rounds,
)
from meshtrain.accounting import CommStats, tensor_bytes, wire_factor
from meshtrain.compile import apply_compile
from meshtrain.config import OptimizerConfig
from meshtrain.data_parallel import DataParallel
from meshtrain.metrics import human_bytes, peak_rss_bytes
from meshtrain.model import build_model
from meshtrain.optim import AdamW
from meshtrain.zero import ShardGroups, Zero3, Zero12

PEERS = {"ZeRO-3": "FSDP2", "ZeRO-2": "DP", "ZeRO-1": "DP"}
THEORY_ELEMENTS = {"DP": 2, "ZeRO-1": 2, "ZeRO-2": 2, "ZeRO-3": 3, "FSDP2": 3}  # x psi x 4 bytes x (N-1)/N


class CollectiveBytes(TorchDispatchMode):
    """Payload bytes of every c10d all-gather (its output) and reduce-scatter (its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "c10d." in name and ("allgather" in name or "reduce_scatter" in name):
            full = args[0] if "allgather" in name else args[1]
            full = full[0] if isinstance(full, list) else full
            self.bytes += full.numel() * full.element_size()
        return func(*args, **(kwargs or {}))


@dataclass
class Contender:
    step: Callable[[], None]
    state: Callable[[], int]
    comm: Callable[[], float]
    """Bytes one step makes this rank send under the ring model (payload x (N-1)/N, 2(N-1)/N for all-reduce)."""


def _ours(kind: str, x: torch.Tensor, y: torch.Tensor, tokens: int, compile_mode: str) -> Contender:
    model, stats = build_model(bench_model_config(), seed=0), CommStats()
    apply_compile([model], compile_mode)  # build step 5: before the engine hooks modules and gradients
    groups = ShardGroups(dist.group.WORLD, None)
    if kind == "DP":
        engine = DataParallel(model, dist.group.WORLD, stats)
    elif kind == "ZeRO-3":
        engine = Zero3(model, groups, stats)
    else:
        engine = Zero12(model, int(kind[-1]), groups, stats, bucket_bytes=25 * 2**20)
    optim = AdamW(engine.optim_params(), OptimizerConfig(), no_decay=engine.no_decay())

    def step() -> None:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum") / tokens
        loss.backward()
        engine.finish()
        optim.step(engine.optim_grads(), 1e-4)
        engine.after_step()
        engine.zero_grad()

    def comm() -> float:
        stats.snapshot_and_reset()
        step()
        return stats.snapshot_and_reset()["comm_wire_bytes"]

    return Contender(step, lambda: tensor_bytes(engine.state_tensors() + optim.state_tensors()), comm)


def _fsdp2(x: torch.Tensor, y: torch.Tensor, tokens: int, compile_mode: str) -> Contender:
    """FSDP2 as its docs recommend for a transformer: one unit per block plus the root, parameters
    resharded after forward, and explicit prefetch of the next block's all-gather in forward and in
    backward (what our ZeRO-3 does). It steps the same AdamW as ours, over its local shards."""
    model = build_model(bench_model_config(), seed=0)
    compile_peer_blocks(model.model.layers, compile_mode)  # torchtitan: compile each block, then shard it
    blocks = list(model.model.layers.values())
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    for here, after in zip(blocks, blocks[1:]):
        here.set_modules_to_forward_prefetch([after])
        after.set_modules_to_backward_prefetch([here])
    named = list(model.named_parameters())
    optim = AdamW(
        [(n, p.to_local()) for n, p in named], OptimizerConfig(), no_decay={n for n, p in named if p.ndim < 2}
    )

    def step() -> None:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum") / tokens
        loss.backward()
        optim.step([p.grad.to_local() for _, p in named], 1e-4)
        for _, p in named:  # keep the sharded grads allocated, like our engines do
            p.grad.to_local().zero_()

    def state() -> int:
        local = [p.to_local() for _, p in named] + [p.grad.to_local() for _, p in named]
        return tensor_bytes(local + optim.state_tensors())

    def comm() -> float:
        counter = CollectiveBytes()
        with counter:
            step()
        return counter.bytes * wire_factor("all_gather", dist.get_world_size())

    return Contender(step, state, comm)


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.manual_seed(rank)
    data = torch.randint(0, bench_model_config().vocab_size, (args.micro_batch, args.seq + 1))
    x, y, tokens = data[:, :-1], data[:, 1:], args.micro_batch * args.seq * world
    names = args.only or ["ZeRO-3", "FSDP2", "ZeRO-1", "ZeRO-2", "DP"]
    contenders = {
        n: _fsdp2(x, y, tokens, args.compile) if n == "FSDP2" else _ours(n, x, y, tokens, args.compile) for n in names
    }
    comm = {n: c.comm() for n, c in contenders.items()}  # also the first warm-up step
    timings = timed_rounds({n: c.step for n, c in contenders.items()}, args.rounds, args.steps)
    state = {n: c.state() for n, c in contenders.items()}
    rss = torch.tensor([peak_rss_bytes()], dtype=torch.float64)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        psi = sum(p.numel() for p in build_model(bench_model_config()).parameters())
        _report(timings, tokens, state, comm, psi, world, int(rss))
        record(
            args,
            [
                ratio(
                    f"ZeRO ({name})",
                    timings,
                    name,
                    peer,
                    tokens,
                    note=f"model states/rank {human_bytes(state[name])} vs {human_bytes(state[peer])}",
                )
                for name, peer in PEERS.items()
                if name in timings and peer in timings
            ],
        )


def _report(
    timings: dict[str, Timing],
    tokens: int,
    state: dict[str, int],
    comm: dict[str, float],
    psi: int,
    world: int,
    rss: int,
) -> None:
    print(f"model: {psi / 1e6:.2f}M params, {world} gloo ranks, {tokens} tokens per step; peak RSS {human_bytes(rss)}")
    print(f"{'':8}{'tokens/s':>10}{'states/rank':>14}{'sent/step':>13}{'theory':>13}")
    for name, t in timings.items():
        theory = THEORY_ELEMENTS[name] * psi * 4 * (world - 1) / world
        print(f"{name:8}{tokens / t.median:10,.0f}{human_bytes(state[name]):>14}{comm[name]:13,.0f}{theory:13,.0f}")
    print(
        "sent/step: bytes a rank sends per step under the ring model; theory: 2 psi (DP, ZeRO-1/2) or "
        "3 psi (ZeRO-3, FSDP2) fp32 elements x (N-1)/N"
    )


def _rss_alone(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.manual_seed(rank)
    data = torch.randint(0, bench_model_config().vocab_size, (args.micro_batch, args.seq + 1))
    name = args.only[0]
    x, y, tokens = data[:, :-1], data[:, 1:], args.micro_batch * args.seq * world
    contender = _fsdp2(x, y, tokens, args.compile) if name == "FSDP2" else _ours(name, x, y, tokens, args.compile)
    for _ in range(3):
        contender.step()
    rss = torch.tensor([peak_rss_bytes()], dtype=torch.float64)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"{name:10} alone: peak RSS {human_bytes(int(rss))}")


def main() -> None:
    p = bench_parser(__doc__, steps=3)
    add_compile_option(p)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--only", nargs="*", help="contenders to run (default: all)")
    p.add_argument("--rss-each", action="store_true", help="also measure each contender's peak RSS alone")
    args = p.parse_args()
    spawn(worker, args.world, args)
    if args.rss_each:
        for name in args.only or ["ZeRO-3", "FSDP2", "ZeRO-1", "ZeRO-2", "DP"]:
            spawn(_rss_alone, args.world, argparse.Namespace(**{**vars(args), "only": [name]}))


if __name__ == "__main__":
    main()
