"""The tensor-parallel plan as data, and `apply_tensor_parallel`, which rewrites a model from outside.

A plan maps module-name patterns (fnmatch, `*` for a block index) to a style. The model file knows
nothing of this: modules are swapped in place, keeping their names, so checkpoints and the optimizer
see the same parameter names as a single-device run. New weights are slices of the module's current
(full, deterministically initialised) weights, so every layout starts from the same model. What
changes beyond the modules (the loss function, which weights are sharded, the traffic) comes back
in the returned `TensorParallel`; nothing is attached to the model.

Sequence parallelism shards the residual stream along the sequence, so a block can no longer infer
token positions from its input's length: the step runner always passes the model the positions of
the whole sequence (meshtrain.core.runner.with_positions), which is what attention sees after the
region's all-gather.

Styles:
  vocab_embedding   rows of the vocabulary split; partial lookups summed (or reduce-scattered, SP)
  attention         a region entry for q, k, v; the head counts divided by the tp degree
  region            a region entry (the MLP's gate and up share it)
  colwise           output features split; no communication of its own (the region entered)
  rowwise           input features split; the region's exit (all-reduce, or reduce-scatter under SP)
  vocab_head        colwise with its own entry; TensorParallel.loss_fn becomes the vocab-parallel
                    cross-entropy over its sharded logits (whole logits in eval mode)
  sequence_sharded  a norm that sees only a sequence shard under SP: its weight gradient is partial,
                    summed over the group once per step (TensorParallel.sum_partial_grads)
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import nn

from meshtrain.accounting import CommStats, Recorder
from meshtrain.core.runner import LossFn
from meshtrain.tensor_parallel.comm import TPComm, all_reduce
from meshtrain.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLoss,
    enter_region,
)

LLAMA_PLAN: dict[str, str] = {
    "model.embed_tokens": "vocab_embedding",
    "model.layers.*.input_layernorm": "sequence_sharded",
    "model.layers.*.self_attn": "attention",
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.post_attention_layernorm": "sequence_sharded",
    "model.layers.*.mlp": "region",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "model.norm": "sequence_sharded",
    "lm_head": "vocab_head",
}
STYLES = ("vocab_embedding", "attention", "region", "colwise", "rowwise", "vocab_head", "sequence_sharded")
SHARD_DIM = {"colwise": 0, "rowwise": 1, "vocab_embedding": 0, "vocab_head": 0}


class _HeadCounts(Protocol):
    """What the attention style needs of its module (the model's attention): per-rank head counts."""

    n_heads: int
    n_kv_heads: int


class _Tee:
    """Counts each collective in the run's CommStats and in its scope's own (per-layer reports)."""

    def __init__(self, *sinks: Recorder) -> None:
        self.sinks = sinks
        self.log = sinks[0].log  # the run's log: one per rank, whatever the scope

    def record(self, kind: str, nbytes: float, group_size: int, ranks: tuple[int, ...] = ()) -> None:
        for sink in self.sinks:
            sink.record(kind, nbytes, group_size, ranks)


@dataclass
class TensorParallel:
    """What apply_tensor_parallel did: which parameters are sharded, and the traffic per scope."""

    group: dist.ProcessGroup
    sequence_parallel: bool
    size: int
    rank: int
    shard_dims: dict[str, int] = field(default_factory=dict)
    """Parameter name -> the dim its full tensor is split along (absent: replicated)."""
    scopes: dict[str, CommStats] = field(default_factory=lambda: defaultdict(CommStats))
    """'layers.3', 'model.embed_tokens', 'lm_head', 'loss', 'partial grads' -> bytes that scope sent."""
    partial_grads: list[nn.Parameter] = field(default_factory=list)
    """Replicated weights whose gradient each rank computes from its sequence shard only (SP norms)."""
    async_tp: bool = False
    """SP's collectives run as collective matmuls (meshtrain.tensor_parallel.layers)."""
    grad_comm: TPComm | None = None
    loss_fn: LossFn | None = None
    """The vocab-parallel cross-entropy over the head's sharded logits; None when no part holds the head."""

    def comm(self, stats: Recorder, scope: str) -> TPComm:
        return TPComm(self.group, _Tee(stats, self.scopes[scope]))

    def sum_partial_grads(self, grads: list[torch.Tensor] | None = None) -> None:
        """After the step's last backward: sum the SP norms' partial gradients, all in one all-reduce
        (Megatron does the same), rather than one per norm per microbatch. `grads` are where the
        gradients live once reduced, in the same order on every rank (ZeRO: pieces of its shards);
        by default the norms' own `.grad`."""
        if grads is None:
            grads = [p.grad for p in self.partial_grads if p.grad is not None]
        if not grads or self.grad_comm is None:
            return
        summed = all_reduce(torch.cat([g.reshape(-1) for g in grads]), self.grad_comm)
        for g, part in zip(grads, summed.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def scope_of(module_name: str) -> str:
    """Traffic is reported per block ('layers.3') and per non-block module."""
    match = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", module_name)
    return f"layers.{match.group(1)}" if match else module_name


class _RegionEntry:
    """A forward pre-hook: the module's first argument enters the tensor-parallel region. Under async
    TP the entry's ring multiplies by the weights of the column layers inside the module (q, k, v)."""

    def __init__(self, comm: TPComm, sequence_parallel: bool, async_tp: bool) -> None:
        self.comm, self.sequence_parallel, self.async_tp = comm, sequence_parallel, async_tp

    @torch.compiler.disable  # the entry collective runs eagerly: a compiled block breaks its graph here
    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ring: list[ColumnParallelLinear] = []
        if self.async_tp:  # looked up per call: the plan swaps the column layers in after this hook
            ring = [m for m in module.modules() if isinstance(m, ColumnParallelLinear) and not m.entry]
        return (enter_region(args[0], self.comm, self.sequence_parallel and module.training, ring), *args[1:])


def match_plan(model: nn.Module, plan: dict[str, str], strict: bool = True) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, style) for every module a pattern names, in model order."""
    bad = sorted(set(plan.values()) - set(STYLES))
    if bad:
        raise ValueError(f"unknown tensor-parallel style(s) {bad}; styles are {', '.join(STYLES)}")
    hits: list[tuple[str, nn.Module, str]] = []
    used: set[str] = set()
    for name, module in model.named_modules():
        styles = [(pat, style) for pat, style in plan.items() if fnmatchcase(name, pat)]
        if len(styles) > 1:
            raise ValueError(f"module {name} matches several plan entries: {[p for p, _ in styles]}")
        if styles:
            used.add(styles[0][0])
            hits.append((name, module, styles[0][1]))
    unused = [pat for pat in plan if pat not in used]
    if strict and unused:
        raise ValueError(f"tensor-parallel plan entries {unused} match no module of {type(model).__name__}")
    return hits


def _check_divisible(name: str, size: int, what: str, t: int) -> None:
    if size % t:
        raise ValueError(f"{name}: {what} {size} is not divisible by the tensor-parallel degree {t}")


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _parallel_module(
    name: str, module: nn.Module, style: str, tp: TensorParallel, comm: TPComm
) -> ColumnParallelLinear | RowParallelLinear | VocabParallelEmbedding:
    dim = SHARD_DIM[style]
    weight = cast(torch.Tensor, module.weight)  # the sharded styles name linears and embeddings
    if getattr(module, "bias", None) is not None:
        raise ValueError(f"{name}: tensor-parallel layers here have no bias; the Llama model uses none")
    _check_divisible(name, weight.shape[dim], "vocabulary size" if style.startswith("vocab") else "features", tp.size)
    sp, ring = tp.sequence_parallel, tp.async_tp
    if style == "colwise":
        return ColumnParallelLinear(weight, comm, sp, entry=False)
    if style == "vocab_head":
        return ColumnParallelLinear(weight, comm, sp, entry=True, gather_in_eval=True, async_tp=ring)
    if style == "rowwise":
        return RowParallelLinear(weight, comm, sp, async_tp=ring)
    return VocabParallelEmbedding(weight, comm, sp)


def _apply_hook_style(name: str, module: nn.Module, style: str, tp: TensorParallel, comm: TPComm) -> None:
    if style == "sequence_sharded":
        if tp.sequence_parallel:  # without SP every rank sees the whole sequence: grads already agree
            tp.partial_grads.extend(module.parameters())
        return
    if style == "attention":
        heads = cast(_HeadCounts, module)
        _check_divisible(name, heads.n_heads, "n_heads", tp.size)
        _check_divisible(name, heads.n_kv_heads, "n_kv_heads", tp.size)
        heads.n_heads, heads.n_kv_heads = heads.n_heads // tp.size, heads.n_kv_heads // tp.size
    module.register_forward_pre_hook(_RegionEntry(comm, tp.sequence_parallel, tp.async_tp))


def apply_tensor_parallel(
    model: nn.Module,
    tp_group: dist.ProcessGroup,
    plan: dict[str, str],
    sequence_parallel: bool,
    stats: Recorder,
    strict: bool = True,
    async_tp: bool = False,
) -> TensorParallel:
    """Rewrite `model` in place into this rank's tensor-parallel part; return what was sharded."""
    return apply_tensor_parallel_parts([model], tp_group, plan, sequence_parallel, stats, strict, async_tp)


def apply_tensor_parallel_parts(
    parts: list[nn.Module],
    tp_group: dist.ProcessGroup,
    plan: dict[str, str],
    sequence_parallel: bool,
    stats: Recorder,
    strict: bool = True,
    async_tp: bool = False,
) -> TensorParallel:
    """`apply_tensor_parallel` over several disjoint parts of one model (a rank's pipeline stages),
    recorded in one TensorParallel. A stage holds a subset of the modules, so pass strict=False there:
    the embedding's, final norm's and head's entries then match nothing on most stages. `async_tp`
    (with SP): the regions' collectives become collective matmuls."""
    tp = TensorParallel(tp_group, sequence_parallel, dist.get_world_size(tp_group), dist.get_rank(tp_group))
    tp.async_tp = async_tp and sequence_parallel
    tp.grad_comm = tp.comm(stats, "partial grads")
    for part in parts:
        _rewrite(part, tp, plan, stats, strict)
    return tp


def _rewrite(model: nn.Module, tp: TensorParallel, plan: dict[str, str], stats: Recorder, strict: bool) -> None:
    new_params: dict[int, nn.Parameter] = {}  # id(full weight) -> its shard: tied weights stay tied
    dims: dict[int, int] = {}
    hits = match_plan(model, plan, strict)
    for name, module, style in hits:
        comm = tp.comm(stats, scope_of(name))
        if style not in SHARD_DIM:
            _apply_hook_style(name, module, style, tp, comm)
            continue
        full = module.weight
        new = _parallel_module(name, module, style, tp, comm)
        if id(full) in new_params:
            new.weight = new_params[id(full)]
        new_params[id(full)] = new.weight
        dims[id(new.weight)] = SHARD_DIM[style]
        if style == "vocab_head":
            tp.loss_fn = VocabParallelLoss(tp.comm(stats, "loss"))
        _swap(model, name, new)
    tp.shard_dims.update({n: dims[id(p)] for n, p in model.named_parameters() if id(p) in dims})
