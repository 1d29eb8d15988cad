"""A parallel layout, where its groups sit on the cluster, and which parameters each rank holds.

The degrees and their arithmetic (world size, dp) are meshtrain.degrees.Degrees, which Layout extends.

Ranks are laid out like torchtitan's device mesh, outermost to innermost:
pp, dp_replicate, dp_shard, cp, tp. A group of `size` ranks spaced `stride` apart stays inside
one node when size*stride <= gpus_per_node, so tp is always the first to get NVLink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshtrain.degrees import Degrees
from meshtrain.model.math import ModelShape, layer_params
from meshtrain.pipeline.schedules import splits_backward

__all__ = ["Group", "Layout", "RankParams", "groups", "layers_per_rank", "rank_params"]


KNOBS = (
    "tp",
    "pp",
    "v",
    "schedule",
    "cp",
    "cp_mode",
    "dp_replicate",
    "dp_shard",
    "ep",
    "zero",
    "micro_batch",
    "recompute",
    "sp",
    "async_tp",
    "offload",
)
"""Every field of a Layout, in the order the search breaks ties and explanations list them."""


@dataclass(frozen=True)
class Layout(Degrees):
    """One way to run the model: the degrees (meshtrain.degrees) plus what the planner varies on top."""

    v: int = 1
    schedule: str = "1f1b"
    cp_mode: str = "ring"
    """ring (keys and values travel the cp ring) or ulysses (all-to-alls trade sequence for heads)."""
    zero: int = 0
    micro_batch: int = 1
    recompute: str = "none"
    sp: bool = False
    async_tp: bool = False
    """SP's collectives run as collective-matmul rings (p2p); the search leaves it off."""
    offload: bool = False

    def sort_key(self) -> tuple[int | str | bool, ...]:
        """The search's tie-break order: the knobs in KNOBS order (smaller model parallelism first)."""
        return tuple(getattr(self, k) for k in KNOBS)

    @property
    def zero_group(self) -> int:
        """Ranks that shard dense ZeRO state: dp_shard and cp hold the same weights (torchtitan's dp_shard_cp)."""
        return self.dp_shard * self.cp

    @property
    def grad_group(self) -> int:
        """Ranks whose dense gradients are summed."""
        return self.dp * self.cp

    def label(self) -> str:
        dp = f"dp{self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 and self.zero else f"dp{self.dp}"
        pp = f" pp{self.pp}" + (f"v{self.v}" if self.v > 1 else "") if self.pp > 1 else ""
        sched = f" {self.schedule}" if self.pp > 1 and self.schedule not in ("1f1b", "interleaved-1f1b") else ""
        extra = "".join(f" {k}{getattr(self, k)}" for k in ("cp", "ep") if getattr(self, k) > 1)
        extra += " ulysses" if self.cp > 1 and self.cp_mode == "ulysses" else ""
        return f"{dp} tp{self.tp}{pp}{sched}{extra}"


@dataclass(frozen=True)
class Group:
    """A communicator: how many ranks and whether its ring leaves the node."""

    size: int
    inter_node: bool


def _group(size: int, stride: int, gpus_per_node: int) -> Group:
    return Group(size, size > 1 and size * stride > gpus_per_node)


def groups(lay: Layout, gpus_per_node: int) -> dict[str, Group]:
    """Every communicator a rank joins, with the mesh order of the module docstring."""
    inner_dp = lay.tp * lay.cp
    return {
        "tp": _group(lay.tp, 1, gpus_per_node),
        "cp": _group(lay.cp, lay.tp, gpus_per_node),
        "ep": _group(lay.ep, lay.tp, gpus_per_node),
        "zero": _group(lay.zero_group, lay.tp, gpus_per_node),
        "expert_zero": _group(lay.zero_group // lay.ep, lay.tp * lay.ep, gpus_per_node),
        "expert_grad": _group(lay.grad_group // lay.ep, lay.tp * lay.ep, gpus_per_node),
        "replicate": _group(lay.dp_replicate, inner_dp * lay.dp_shard, gpus_per_node),
        "grad": _group(lay.grad_group, lay.tp, gpus_per_node),
        "pp": _group(lay.pp, lay.world_size // lay.pp, gpus_per_node),
    }


def deferred_weight_grads(lay: Layout) -> bool:
    """Whether the pipeline schedule computes weight gradients in a separate W step, outside autograd:
    ZeRO-2 then keeps whole gradients over the step and reduces them once (meshtrain.zero.stage12);
    ZeRO-3 reduces each unit after its W, holding its norms' gradients until then (zero.stage3)."""
    return lay.pp > 1 and splits_backward(lay.schedule)


def layers_per_rank(shape: ModelShape, lay: Layout) -> int:
    """Blocks on the busiest pipeline rank; uneven splits round up (pp need not divide layers)."""
    return lay.v * math.ceil(shape.n_layers / (lay.pp * lay.v))


@dataclass(frozen=True)
class RankParams:
    """Parameter elements one rank holds, split by the group that shards their ZeRO state."""

    dense: float
    expert: float
    unit_dense: float
    """One block's dense parameters on this rank before ZeRO-3 sharding (the gather unit)."""
    unit_expert: float

    @property
    def total(self) -> float:
        return self.dense + self.expert

    @property
    def unit(self) -> float:
        return self.unit_dense + self.unit_expert


def _block_params_on_rank(shape: ModelShape, lay: Layout, moe: bool | None = None) -> tuple[float, float]:
    """(dense, expert) elements of one block on one rank (`moe` as in layer_params). Megatron splits
    matrices and column-parallel biases over tp; norms and row-parallel biases are replicated; shared
    experts are dense matrices, split like the MLP."""
    parts = layer_params(shape, moe)
    d = shape.hidden
    dense = parts["attention"] / lay.tp + parts["norms"] + parts.get("router", 0)
    dense += parts.get("shared_experts", 0) / lay.tp
    if shape.kind == "gpt":
        dense += (parts["attention_bias"] - d) / lay.tp + d
        if "mlp" in parts:
            dense += parts["mlp"] / lay.tp + (parts["mlp_bias"] - d) / lay.tp + d
    elif "mlp" in parts:
        dense += parts["mlp"] / lay.tp
    expert = parts.get("experts", 0) / (lay.tp * lay.ep)
    return dense, expert


def rank_params(shape: ModelShape, lay: Layout, first: bool, last: bool, layers: int | None = None) -> RankParams:
    """Parameters on a rank of the first and/or last pipeline stage (both when pp == 1), holding
    `layers` blocks (default: the busiest rank's, layers_per_rank).
    Embedding and head are vocab-parallel over tp; a tied matrix is duplicated when pp > 1."""
    dense_block, expert_block = _block_params_on_rank(shape, lay)
    n = layers_per_rank(shape, lay) if layers is None else layers
    dense = n * dense_block
    # an MoE model's leading dense blocks sit on the first stage
    plain = min(shape.first_dense_layers, n) if shape.is_moe and first else 0
    if plain:
        dense += plain * (_block_params_on_rank(shape, lay, moe=False)[0] - dense_block)
    d, v = shape.hidden, shape.vocab
    if first:
        dense += v * d / lay.tp + (shape.seq_len * d if shape.kind == "gpt" else 0)
    if last:
        dense += 2 * d if shape.kind == "gpt" else d
        if not shape.tie_embeddings or not first:
            dense += v * d / lay.tp
    return RankParams(dense=dense, expert=(n - plain) * expert_block, unit_dense=dense_block, unit_expert=expert_block)
