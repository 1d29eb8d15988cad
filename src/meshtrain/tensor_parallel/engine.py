"""The GradEngine seen by the trainer when tensor parallelism is on: a data-parallel engine underneath
(plain DP or ZeRO 1-3, over this rank's tp-local parameters), plus what tensor sharding changes
about gradients and state.

- Under SP, the norm weights' gradients are partial per sequence shard: finish() sums them over tp,
  after the inner engine's reduction. Both are sums, so the order does not matter, only that each
  happens once; summing afterwards works on whatever the inner engine holds (ZeRO: its shard, whose
  layout is the same on every tp rank because their tp-local parameters have the same shapes).
- The gradient norm adds the squared norms of sharded parameters over the tp group, and counts the
  replicated ones (norm weights, equal on every tp rank) once; under ZeRO each is first summed over
  the dp_shard group, whose ranks hold disjoint pieces.
- Weights and the optimizer's moments are saved as DTensors of their full shape under the Hugging
  Face names, so torch.distributed.checkpoint writes one full tensor per name, and loads it back at
  any tp degree, ZeRO stage or shard count, or into a run without tensor parallelism (and the other
  way round).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from meshtrain.accounting import CommStats, Recorder
from meshtrain.core import comm
from meshtrain.core.engine import EngineDecorator, GradEngine
from meshtrain.core.parts import as_parts
from meshtrain.tensor_parallel.plan import TensorParallel


class FullShapeState:
    """A sharded engine's Stateful checkpoint view (ZeRO's), with each tensor-parallel weight, or its
    moments, shown to DCP as a DTensor of the full shape; other entries pass through."""

    def __init__(self, inner: Stateful, as_full: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        self._inner, self._as_full = inner, as_full

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: self._as_full(key, value) for key, value in self._inner.state_dict().items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self._inner.load_state_dict({k: v.to_local() if isinstance(v, DTensor) else v for k, v in sd.items()})

    def __getitem__(self, key: str) -> torch.Tensor:
        # AdamW.load_state_dict reads the restored step count from here; only the optimizer's view is
        # indexed, and ZeRO's (OptimState) is a dict
        return cast(Mapping[str, torch.Tensor], self._inner)[key]


class TensorParallelEngine(EngineDecorator):
    # Every forward runs collectives over the tp group: all ranks must call the model together.
    collective_forward = True

    def __init__(
        self, inner: GradEngine, model: nn.Module | list[nn.Module], tp: TensorParallel, stats: Recorder | None = None
    ) -> None:
        super().__init__(inner)
        self.parts, self.tp = as_parts(model), tp
        self.stats: Recorder = stats if stats is not None else CommStats()  # logs the norm's (uncounted) reductions
        device = next(self.parts[0].parameters()).device.type
        self.mesh = DeviceMesh.from_group(tp.group, device)
        partial = {id(p) for p in tp.partial_grads}
        self.partial_names = {n for part in self.parts for n, p in part.named_parameters() if id(p) in partial}

    # ---- what tensor parallelism changes in the GradEngine contract (meshtrain.core.engine) -----
    def finish(self) -> None:
        self.inner.finish()
        self.tp.sum_partial_grads([g for n, g in self._named_grads() if n in self.partial_names])

    def grad_norm(self) -> torch.Tensor:
        sq = torch.zeros(2, dtype=torch.float64)  # [replicated over tp, sharded over tp]
        for name, grad in self._named_grads():
            sq[int(name in self.tp.shard_dims)] += torch.linalg.vector_norm(grad, dtype=torch.float64).square().cpu()
        if self.inner.shard_group is not None:
            comm.all_reduce(sq, self.inner.shard_group, self.stats, counted=False)
        sharded = sq[1].clone()
        comm.all_reduce(sharded, self.tp.group, self.stats, counted=False)
        return (sq[0] + sharded).sqrt().float()

    def _named_grads(self) -> list[tuple[str, torch.Tensor]]:
        """(parameter name, gradient or this rank's piece of it), in the same order on every tp rank."""
        return [(name, grad) for (name, _), grad in zip(self.inner.optim_params(), self.inner.optim_grads())]

    def model_state_dict(self) -> dict[str, torch.Tensor] | Stateful:
        return self._full_shape(self.inner.model_state_dict(), self._as_full)

    def optim_state_dict(self, optim_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | Stateful:
        """Keys are `exp_avg.<param name>` and the like: moments of a sharded weight are sharded alike."""
        return self._full_shape(
            self.inner.optim_state_dict(optim_sd), lambda key, value: self._as_full(key.partition(".")[2], value)
        )

    @staticmethod
    def _full_shape(
        inner: dict[str, torch.Tensor] | Stateful, as_full: Callable[[str, torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor] | Stateful:
        # ZeRO hands out a Stateful that gathers its shards only when DCP asks: convert then, not now.
        if isinstance(inner, Stateful):
            return FullShapeState(inner, as_full)
        return {key: as_full(key, value) for key, value in inner.items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight whole, on every rank (collective): for sampling or exporting."""
        sd = self.model_state_dict()
        sd = sd.state_dict() if isinstance(sd, Stateful) else sd
        return {n: v.full_tensor() if isinstance(v, DTensor) else v.detach() for n, v in sd.items()}

    def num_params(self) -> int:
        return sum(
            p.numel() * (self.tp.size if n in self.tp.shard_dims else 1)
            for part in self.parts
            for n, p in part.named_parameters()
        )

    def step_metrics(self) -> dict[str, float]:
        """The tensor-parallel bytes one block sent this step (payload, all kinds), mean over blocks."""
        blocks = [stats for scope, stats in self.tp.scopes.items() if scope.startswith("layers.")]
        out = dict(self.inner.step_metrics())
        if blocks:
            out["comm_tp_block_bytes"] = sum(sum(b.payload.values()) for b in blocks) / len(blocks)
            out["comm_tp_block_wire_bytes"] = sum(b.wire for b in blocks) / len(blocks)
        for stats in self.tp.scopes.values():
            stats.snapshot_and_reset()
        return out

    def describe(self) -> str:
        sp = " with sequence parallelism" if self.tp.sequence_parallel else ""
        sp += " as collective matmuls (async TP)" if self.tp.async_tp else ""
        return (
            f"tensor parallel over {self.tp.size} ranks{sp}: {len(self.tp.shard_dims)} weights sharded, "
            f"the rest replicated | {self.inner.describe()}"
        )

    def _as_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """A sharded parameter's local tensor (or its moments) as a DTensor of the full shape."""
        dim = self.tp.shard_dims.get(name)
        if dim is None:
            return local
        shape = list(local.shape)
        shape[dim] *= self.tp.size
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            local.detach(), self.mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=stride
        )
