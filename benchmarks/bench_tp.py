"""Our tensor parallelism against torch's DTensor TP: same model, same split, 2 gloo ranks.

DTensor's side is `parallelize_module` with ColwiseParallel (q, k, v, gate, up, and the head with
vocab-sharded output under `loss_parallel`) and RowwiseParallel (o, down, and the vocab-sharded
embedding). Both step the same AdamW over their local shards. Prints tokens/s of each and their
ratio, and the bytes one block hands to collectives per microbatch against Narayanan's count.
    python benchmarks/bench_tp.py [--rounds 5] [--steps 5] [--micro-batch 8] [--seq 128] [--sp]

With --async-tp the contenders are our TP + SP with and without async TP (collective matmul), and
it also reports how much communication async TP hides: SP's collectives of one step, replayed
alone (the same kinds, sizes and order, no compute), take C seconds; plain SP blocks on every one
of them (its backward re-gather aside), so a step without any waiting would be T_sp - C. The share
hidden is (T_sp - T_async) / C: 1 when the rings cost nothing beyond the compute, 0 when they gain
nothing, below 0 when the t-fold more, smaller messages cost more than the overlap saves.
    python benchmarks/bench_tp.py --async-tp [--world 2]
"""

from __future__ import annotations

import argparse
import functools
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
from meshtrain.accounting import CommStats, wire_factor
from meshtrain.compile import apply_compile
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
    """CommStats that also counts the collectives, and with `trace` on lists them (kind, bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.trace: list[tuple[str, float]] | None = None

    def record(self, kind: str, nbytes: float, group_size: int, ranks: tuple[int, ...] = ()) -> None:
        super().record(kind, nbytes, group_size, ranks)
        self.calls += 1
        if self.trace is not None:
            self.trace.append((kind, nbytes))


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
                    input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
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
    apply_compile([ours], args.compile)  # build step 5: after TP swapped the layers in
    theirs = dtensor_model(world, args.sp, args.seq)
    compile_peer_blocks(theirs.model.layers, args.compile)  # torchtitan: after parallelize_module
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


SP_KINDS = ("all_gather", "reduce_scatter")


def _ring_step(sent: torch.Tensor, got: torch.Tensor) -> None:
    r, t = dist.get_rank(), dist.get_world_size()
    ops = [dist.P2POp(dist.isend, sent, (r - 1) % t), dist.P2POp(dist.irecv, got, (r + 1) % t)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def _replay(trace: list[tuple[str, float]], world: int) -> Callable[[], None]:
    """One step's all-gathers, reduce-scatters or ring steps (fp32, bytes as counted), alone."""
    calls: list[Callable[[], object]] = []
    for kind, nbytes in trace:
        whole = torch.zeros(int(nbytes) // 4)
        part = torch.zeros(whole.numel() // world)
        if kind == "all_gather":
            calls.append(lambda o=whole, i=part: dist.all_gather_single(o, i))
        elif kind == "reduce_scatter":
            calls.append(lambda o=part, i=whole: dist.reduce_scatter_single(o, i))
        elif kind == "p2p":
            calls.append(functools.partial(_ring_step, whole, torch.zeros_like(whole)))

    def run() -> None:
        for call in calls:
            call()

    return run


def _traced(step: Callable[[], None], stats: CountingStats) -> list[tuple[str, float]]:
    stats.trace = []
    step()
    trace, stats.trace = stats.trace, None
    return trace


def async_worker(rank: int, world: int, args: argparse.Namespace) -> None:
    """Our TP + SP with and without async TP, and SP's collectives alone (module docstring)."""
    cfg = bench_model_config()
    torch.manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1))
    x, y = data[:, :-1], data[:, 1:]
    tokens = args.micro_batch * args.seq
    steps, traces = {}, {}
    for name, ring in (("TP + SP", False), ("async TP", True)):
        model, stats = build_model(cfg, seed=0), CountingStats()
        tp = apply_tensor_parallel(model, dist.group.WORLD, LLAMA_PLAN, True, stats, async_tp=ring)
        if tp.loss_fn is None:
            raise RuntimeError("tensor parallelism found no head to shard")
        steps[name] = step_fn(model, tp.loss_fn, x, y, tokens)
        traces[name] = _traced(steps[name], stats)
    replaced = [(k, n) for k, n in traces["TP + SP"] if k in SP_KINDS]
    kept = sum(1 for k, _ in traces["async TP"] if k in SP_KINDS)  # the embedding's pair stays
    steps["SP collectives alone"] = _replay(replaced, world)
    steps["rings alone"] = _replay([(k, n) for k, n in traces["async TP"] if k == "p2p"], world)
    timings = timed_rounds(steps, args.rounds, args.steps)
    if rank == 0:
        _report_async(timings, tokens, traces, len(replaced) - kept, args, world)


def _report_async(
    timings: dict[str, Timing],
    tokens: int,
    traces: dict[str, list[tuple[str, float]]],
    rings: int,
    args: argparse.Namespace,
    world: int,
) -> None:
    cfg = bench_model_config()
    t_sp, t_async, comm = (timings[n].median for n in ("TP + SP", "async TP", "SP collectives alone"))
    print(
        f"model: dim {cfg.dim}, {cfg.n_layers} layers | tp={world} gloo ranks + SP | {tokens} tokens per step | "
        f"{rings} collectives per step become rings"
    )
    print(f"{'':22}{'ms/step':>10}{'p2p MB/step':>14}{'AG+RS MB/step':>15}")
    for name in ("TP + SP", "async TP"):
        p2p = sum(n for k, n in traces[name] if k == "p2p") / 1e6
        coll = sum(n for k, n in traces[name] if k in SP_KINDS) / 1e6
        print(f"{name:22}{1e3 * timings[name].median:10.1f}{p2p:14.2f}{coll:15.2f}")
    print(f"{'SP collectives alone':22}{1e3 * comm:10.1f}")
    print(f"{'rings alone':22}{1e3 * timings['rings alone'].median:10.1f}")
    per_round = [
        (s - a) / c for s, a, c in zip(*(timings[n].rounds for n in ("TP + SP", "async TP", "SP collectives alone")))
    ]
    hidden = (t_sp - t_async) / comm if comm > 0 else 0.0
    print(
        f"communication hidden: (T_sp - T_async) / C = {hidden:.2f} (per round min {min(per_round):.2f}, "
        f"max {max(per_round):.2f}); C is {comm / t_sp:.0%} of the SP step"
    )
    record(
        args,
        [
            ratio(
                "async TP (collective matmul)",
                timings,
                "async TP",
                "TP + SP",
                tokens,
                note=f"communication hidden {hidden:.2f} of C = {1e3 * comm:.1f} ms (SP's collectives alone)",
            )
        ],
    )


def main() -> None:
    p = bench_parser(__doc__, steps=5)
    add_compile_option(p)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sp", action="store_true", help="sequence parallelism on both sides")
    p.add_argument("--async-tp", action="store_true", help="our TP + SP with and without async TP")
    args = p.parse_args()
    if args.compile != "none" and args.async_tp:
        p.error("--compile applies to the DTensor comparison; the async-TP rows compare ours with ours")
    spawn(async_worker if args.async_tp else worker, args.world, args)


if __name__ == "__main__":
    main()
