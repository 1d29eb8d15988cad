"""Our bucketed data parallelism against torch DDP: same model, data and optimizer, 2 gloo ranks.

DDP is configured as its docs recommend for this case: 25 MB buckets (both sides), no buffer
broadcast (the model has none that change), gradients as bucket views (no copy into the buckets,
as ours), and no comm hook. Prints the tokens/s ratio per round (median, min, max) and the bytes
all-reduced per step by each side, both read from torch.profiler's records of gloo's all-reduces,
against the theoretical 2(N-1)/N * Psi * 4 bytes a ring all-reduce makes each rank send.
    python benchmarks/bench_dp.py [--rounds 7] [--steps 5] [--micro-batch 8] [--seq 128] [--json FILE]
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (
    add_compile_option,
    bench_model_config,
    bench_parser,
    compile_peer_blocks,
    profiled_all_reduce_bytes,
    ratio,
    record,
    spawn,
    timed_rounds,
)
from meshtrain.accounting import CommStats, wire_factor
from meshtrain.compile import apply_compile
from meshtrain.config import OptimizerConfig
from meshtrain.data_parallel import DataParallel
from meshtrain.model import build_model
from meshtrain.optim import AdamW


def _step_fn(
    model: nn.Module,
    engine: DataParallel | None,
    optim: AdamW,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    tokens: int,
):
    def step() -> None:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum") / tokens
        loss.backward()
        if engine is not None:
            engine.finish()
        optim.step([p.grad for p in params], 1e-4)
        if engine is not None:
            engine.zero_grad()
        else:
            for p in params:  # DDP's bucket views are zeroed in place, as ours are
                p.grad.zero_()

    return step


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    cfg = bench_model_config()
    torch.manual_seed(rank)
    data = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1))
    x, y = data[:, :-1], data[:, 1:]
    tokens = args.micro_batch * args.seq * world
    ours_model, ddp_model = build_model(cfg, seed=0), build_model(cfg, seed=0)
    apply_compile([ours_model], args.compile)  # build step 5: before the engine hooks the gradients
    compile_peer_blocks(ddp_model.model.layers, args.compile)
    engine = DataParallel(ours_model, dist.group.WORLD, CommStats(), bucket_bytes=25 * 2**20)
    ddp = DDP(ddp_model, bucket_cap_mb=25, broadcast_buffers=False, gradient_as_bucket_view=True)
    opt_cfg = OptimizerConfig()
    ours_params, ddp_params = engine.params, list(ddp_model.parameters())
    contenders = {
        "meshtrain DP": _step_fn(
            ours_model,
            engine,
            AdamW([(str(i), p) for i, p in enumerate(ours_params)], opt_cfg),
            ours_params,
            x,
            y,
            tokens,
        ),
        "torch DDP": _step_fn(
            ddp, None, AdamW([(str(i), p) for i, p in enumerate(ddp_params)], opt_cfg), ddp_params, x, y, tokens
        ),
    }
    timings = timed_rounds(contenders, args.rounds, args.steps)
    sent = {name: profiled_all_reduce_bytes(step) for name, step in contenders.items()}
    if rank == 0:
        psi = sum(p.numel() for p in ours_params)
        theory = wire_factor("all_reduce", world) * psi * 4
        print(f"model: {psi / 1e6:.2f}M params, {world} gloo ranks, {tokens} tokens per step, {args.rounds} rounds")
        for name, nbytes in sent.items():
            print(
                f"{name:14} all-reduced {nbytes:,} bytes/step; ring sends {nbytes * wire_factor('all_reduce', world):,.0f}"
                f" per rank; theory 2(N-1)/N*Psi*4 = {theory:,.0f} (ratio {nbytes * wire_factor('all_reduce', world) / theory:.4f})"
            )
        record(
            args,
            [
                ratio(
                    "DP",
                    timings,
                    "meshtrain DP",
                    "torch DDP",
                    tokens,
                    note=f"all-reduce bytes/step ours {sent['meshtrain DP']:,} vs DDP {sent['torch DDP']:,}",
                )
            ],
        )


def main() -> None:
    p = bench_parser(__doc__)
    add_compile_option(p)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args()
    spawn(worker, args.world, args)


if __name__ == "__main__":
    main()
