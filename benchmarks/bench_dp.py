"""Our bucketed data parallelism against torch DDP: same model, data and optimizer, 2 gloo ranks.

Prints tokens/s of each and their ratio, and the bytes all-reduced per step against the theoretical
2(N-1)/N * Psi * 4 bytes a ring all-reduce moves per rank.
    python benchmarks/bench_dp.py [--rounds 5] [--steps 5] [--micro-batch 8] [--seq 128]
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from common import bench_model_config, bench_parser, spawn, timed_rounds
from meshtrain.accounting import CommStats, wire_factor
from meshtrain.config import OptimizerConfig
from meshtrain.data_parallel import DataParallel
from meshtrain.model import build_model
from meshtrain.optim import AdamW


def _ddp_counting_hook(counter: list[int]):
    def hook(state, bucket):  # torch's default all-reduce, with the bytes counted
        buf = bucket.buffer()
        counter[0] += buf.numel() * buf.element_size()
        fut = dist.all_reduce(buf, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    return hook


def _step_fn(model, engine, optim, params, x, y, tokens):
    def step() -> None:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum") / tokens
        loss.backward()
        if engine is not None:
            engine.finish()
        optim.step([p.grad for p in params], 1e-4)
        if engine is not None:
            engine.zero_grad()
        else:
            for p in params:
                p.grad = None
    return step


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    cfg = bench_model_config()
    torch.manual_seed(rank)
    data = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1))
    x, y = data[:, :-1], data[:, 1:]
    tokens = args.micro_batch * args.seq * world
    ours_model, ddp_model = build_model(cfg, seed=0), build_model(cfg, seed=0)
    stats = CommStats()
    engine = DataParallel(ours_model, dist.group.WORLD, stats, bucket_bytes=int(args.bucket_mb * 2**20))
    ddp = DDP(ddp_model, bucket_cap_mb=25)
    ddp_bytes = [0]
    ddp.register_comm_hook(None, _ddp_counting_hook(ddp_bytes))
    opt_cfg = OptimizerConfig()
    ours_params, ddp_params = engine.params, list(ddp_model.parameters())
    contenders = {
        "meshtrain DP": _step_fn(ours_model, engine, AdamW([(str(i), p) for i, p in enumerate(ours_params)], opt_cfg),
                                 ours_params, x, y, tokens),
        "torch DDP": _step_fn(ddp, None, AdamW([(str(i), p) for i, p in enumerate(ddp_params)], opt_cfg),
                              ddp_params, x, y, tokens),
    }
    n_calls = (2 + args.rounds * args.steps)
    secs = timed_rounds(contenders, args.rounds, args.steps)
    if rank == 0:
        _report(secs, tokens, stats.payload["all_reduce"] / n_calls, ddp_bytes[0] / n_calls,
                sum(p.numel() for p in ours_params), world)


def _report(secs: dict[str, float], tokens: int, ours_bytes: float, ddp_bytes: float, psi: int, world: int) -> None:
    ours, ref = tokens / secs["meshtrain DP"], tokens / secs["torch DDP"]
    theory = wire_factor("all_reduce", world) * psi * 4
    print(f"model: {psi / 1e6:.2f}M params, {world} gloo ranks, {tokens} tokens per step")
    print(f"{'':16}{'tokens/s':>12}{'all-reduce payload/step':>26}{'ring bytes sent/rank':>24}")
    print(f"{'meshtrain DP':16}{ours:12,.0f}{ours_bytes:26,.0f}{ours_bytes * wire_factor('all_reduce', world):24,.0f}")
    print(f"{'torch DDP':16}{ref:12,.0f}{ddp_bytes:26,.0f}{ddp_bytes * wire_factor('all_reduce', world):24,.0f}")
    print(f"tokens/s ratio meshtrain/DDP: {ours / ref:.3f}")
    print(f"theory 2(N-1)/N*Psi*4 = {theory:,.0f} bytes per rank; ours/theory = "
          f"{ours_bytes * wire_factor('all_reduce', world) / theory:.4f}")


def main() -> None:
    p = bench_parser(__doc__)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--bucket-mb", type=float, default=25.0, help="our bucket size (DDP keeps its default 25)")
    args = p.parse_args()
    spawn(worker, args.world, args)


if __name__ == "__main__":
    main()
