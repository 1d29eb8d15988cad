"""Our tensor parallelism against torch's DTensor TP: same model, same split, 2 gloo ranks.

DTensor's side is `parallelize_module` with ColwiseParallel (q, k, v, gate, up, and the head with
vocab-sharded output under `loss_parallel`) and RowwiseParallel (o, down, and the vocab-sharded
embedding). Both step the same AdamW over their local shards. Prints tokens/s of each and their
ratio, and the bytes one block hands to collectives per microbatch against Narayanan's count.
    python benchmarks/bench_tp.py [--rounds 5] [--steps 5] [--micro-batch 8] [--seq 128] [--sp]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

from common import Timing, bench_model_config, bench_parser, ratio, record, spawn, timed_rounds
from meshtrain.accounting import CommStats, wire_factor
from meshtrain.config import OptimizerConfig
from meshtrain.model import build_model
from meshtrain.optim import AdamW
from meshtrain.tensor_parallel import LLAMA_PLAN, apply_tensor_parallel
from meshtrain.tools.tp_measure import block_comm_theory

DTENSOR_PLAN = {
    "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
    "model.layers.*.self_attn.q_proj": ColwiseParallel(),
    "model.layers.*.self_attn.k_proj": ColwiseParallel(),
    "model.layers.*.self_attn.v_proj": ColwiseParallel(),
    "model.layers.*.self_attn.o_proj": RowwiseParallel(),
    "model.layers.*.mlp.gate_proj": ColwiseParallel(),
    "model.layers.*.mlp.up_proj": ColwiseParallel(),
    "model.layers.*.mlp.down_proj": RowwiseParallel(),
    "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
}


class CountingStats(CommStats):
    """CommStats that also counts the collectives."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def record(self, kind: str, nbytes: int, group_size: int) -> None:
        super().record(kind, nbytes, group_size)
        self.calls += 1


def dtensor_model(world: int, sp: bool, seq: int) -> nn.Module:
    model = build_model(bench_model_config(), seed=0)
    mesh = init_device_mesh("cpu", (world,))
    plan = dict(DTENSOR_PLAN)
    if sp:
        from torch.distributed.tensor.parallel import PrepareModuleInput, SequenceParallel

        plan.update(
            {
                "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
                "model.layers.*.input_layernorm": SequenceParallel(),
                "model.layers.*.post_attention_layernorm": SequenceParallel(),
                "model.norm": SequenceParallel(),
                "model.layers.*.self_attn": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
                ),
                "model.layers.*.mlp": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "model.layers.*.self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                "model.layers.*.mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
                "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
            }
        )
    parallelize_module(model, mesh, plan, src_data_rank=None)
    for block in model.model.layers.values():
        block.self_attn.n_heads //= world
        block.self_attn.n_kv_heads //= world
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_grad(p: torch.Tensor) -> torch.Tensor:
    """A DTensor gradient laid out like its parameter (the embedding's can come back replicated)."""
    g = p.grad
    if isinstance(g, DTensor) and g.placements != p.placements:
        g = g.redistribute(g.device_mesh, p.placements)
    return _local(g)


def step_fn(
    model: nn.Module,
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    tokens: int,
) -> Callable[[], None]:
    params = list(model.parameters())
    optim = AdamW([(str(i), _local(p)) for i, p in enumerate(params)], OptimizerConfig())

    positions = torch.arange(x.shape[1])  # both models get them, as the step runner passes them

    def step() -> None:
        (loss_of(model(x, positions), y) / tokens).backward()
        optim.step([_local_grad(p) for p in params], 1e-4)
        for p in params:
            p.grad = None

    return step


def dtensor_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel inside `loss_parallel` (entered around the whole step by _with_loss_parallel)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def _with_loss_parallel(step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with loss_parallel():  # the backward of a DTensor loss needs the context too
            step()

    return run


def _check_same_loss(
    ours: nn.Module,
    ours_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    theirs: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """Both sides compute the same model: otherwise the timings compare different work."""
    with torch.no_grad(), loss_parallel():
        positions = torch.arange(x.shape[1])
        a, b = ours_loss(ours(x, positions), y), dtensor_loss(theirs(x, positions), y)
    b = b.full_tensor() if isinstance(b, DTensor) else b
    if not torch.allclose(a, b, rtol=1e-5):
        raise RuntimeError(f"the two models disagree: loss {float(a)} vs {float(b)}")


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    # CommDebugMode's module tracker warns about the embedding's integer input; harmless here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    cfg = bench_model_config()
    torch.manual_seed(0)  # TP ranks see the same batch
    data = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1))
    x, y = data[:, :-1], data[:, 1:]
    tokens = args.micro_batch * args.seq
    ours = build_model(cfg, seed=0)
    stats = CountingStats()
    tp = apply_tensor_parallel(ours, dist.group.WORLD, LLAMA_PLAN, args.sp, stats)
    theirs = dtensor_model(world, args.sp, args.seq)
    if tp.loss_fn is None:
        raise RuntimeError("tensor parallelism found no head to shard")
    _check_same_loss(ours, tp.loss_fn, theirs, x, y)
    for scope in tp.scopes.values():
        scope.snapshot_and_reset()
    stats.calls = 0
    contenders = {
        "meshtrain TP": step_fn(ours, tp.loss_fn, x, y, tokens),
        "torch DTensor TP": _with_loss_parallel(step_fn(theirs, dtensor_loss, x, y, tokens)),
    }
    timings = timed_rounds(contenders, args.rounds, args.steps)
    calls = 2 + args.rounds * args.steps
    block = {k: v / calls for k, v in tp.scopes["layers.0"].payload.items()}
    wire = tp.scopes["layers.0"].wire / calls
    collectives = {"meshtrain TP": round(stats.calls / calls)}
    # DTensor's collectives are counted by torch's CommDebugMode, on one more step. (Ours are not: the
    # mode's module hooks re-wrap module inputs, which would change our step; see region_linear.)
    with CommDebugMode() as debug:
        contenders["torch DTensor TP"]()
    collectives["torch DTensor TP"] = debug.get_total_counts()
    if rank == 0:
        _report(timings, tokens, block, wire, collectives, args, world)


def _report(
    timings: dict[str, Timing],
    tokens: int,
    block: dict[str, float],
    wire: float,
    collectives: dict[str, int],
    args: argparse.Namespace,
    world: int,
) -> None:
    cfg = bench_model_config()
    theory = block_comm_theory(args.micro_batch, args.seq, cfg.dim, 4, args.sp)
    theory_wire = sum(n * wire_factor(k, world) for k, n in theory.items())
    print(
        f"model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads | tp={world} gloo ranks"
        f"{' + sequence parallel' if args.sp else ''} | {tokens} tokens per step"
    )
    print(f"{'':20}{'tokens/s':>12}{'ms/step':>10}{'collectives/step':>18}")
    for name, t in timings.items():
        print(f"{name:20}{tokens / t.median:12,.0f}{1e3 * t.median:10.1f}{collectives[name]:18}")
    print("bytes one block hands to TP collectives per microbatch (payload; fwd + bwd):")
    for kind in sorted(set(block) | set(theory)):
        print(f"  {kind:15}{block.get(kind, 0):14,.0f} measured{theory.get(kind, 0):14,.0f} theory")
    print(f"  {'ring wire/rank':15}{wire:14,.0f} measured{theory_wire:14,.0f} theory")
    record(
        args,
        [
            ratio(
                "TP + SP" if args.sp else "TP",
                timings,
                "meshtrain TP",
                "torch DTensor TP",
                tokens,
                note=f"collectives/step {collectives['meshtrain TP']} vs {collectives['torch DTensor TP']}",
            )
        ],
    )


def main() -> None:
    p = bench_parser(__doc__, steps=5)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sp", action="store_true", help="sequence parallelism on both sides")
    args = p.parse_args()
    spawn(worker, args.world, args)


if __name__ == "__main__":
    main()
