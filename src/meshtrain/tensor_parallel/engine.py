"""The GradEngine seen by the trainer when tensor parallelism is on: a data-parallel engine underneath,
plus what tensor sharding changes about gradients and state.

- Under SP, the norm weights' gradients are partial per sequence shard: finish() sums them.
- The gradient norm adds the squared norms of sharded parameters over the tp group, and counts the
  replicated ones (norm weights, equal on every tp rank) once.
- Weights and the optimizer's moments are saved as DTensors of their full shape under the Hugging
  Face names, so torch.distributed.checkpoint writes one full tensor per name, and loads it back at
  any tp degree, or into a run without tensor parallelism (and the other way round).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from meshtrain.engine import GradEngine
from meshtrain.tensor_parallel.plan import TensorParallel


class TensorParallelEngine:
    # Every forward runs collectives over the tp group: all ranks must call the model together.
    collective_forward = True

    def __init__(self, inner: GradEngine, model: nn.Module, tp: TensorParallel) -> None:
        self.inner, self.model, self.tp = inner, model, tp
        device = next(model.parameters()).device.type
        self.mesh = DeviceMesh.from_group(tp.group, device)

    # ---- the GradEngine contract (meshtrain.engine) -------------------------------------------
    def optim_params(self) -> list[tuple[str, torch.Tensor]]:
        return self.inner.optim_params()

    def no_decay(self) -> set[str]:
        return self.inner.no_decay()

    def set_sync(self, sync: bool) -> None:
        self.inner.set_sync(sync)

    def finish(self) -> None:
        self.inner.finish()
        self.tp.sum_partial_grads()

    def optim_grads(self) -> list[torch.Tensor]:
        return self.inner.optim_grads()

    def grad_norm(self) -> torch.Tensor:
        sharded = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)
        for (name, _), grad in zip(self.inner.optim_params(), self.inner.optim_grads()):
            sq = torch.linalg.vector_norm(grad, dtype=torch.float64).square().cpu()
            if name in self.tp.shard_dims:
                sharded += sq
            else:
                replicated += sq
        dist.all_reduce(sharded, group=self.tp.group)
        return (sharded + replicated).sqrt().float()

    def scale_grads(self, factor: float) -> None:
        self.inner.scale_grads(factor)

    def after_step(self) -> None:
        self.inner.after_step()

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def state_tensors(self) -> list[torch.Tensor]:
        return self.inner.state_tensors()

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: self._as_full(name, value) for name, value in self.inner.model_state_dict().items()}

    def optim_state_dict(self, optim_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keys are `exp_avg.<param name>` and the like: moments of a sharded weight are sharded alike."""
        inner = self.inner.optim_state_dict(optim_sd)
        return {key: self._as_full(key.partition(".")[2], value) for key, value in inner.items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight whole, on every rank (collective): for sampling or exporting."""
        return {n: v.full_tensor() if isinstance(v, DTensor) else v.detach()
                for n, v in self.model_state_dict().items()}

    def num_params(self) -> int:
        return sum(v.numel() for v in self.model_state_dict().values())

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
        return (f"tensor parallel over {self.tp.size} ranks{sp}: {len(self.tp.shard_dims)} weights sharded, "
                f"the rest replicated | {self.inner.describe()}")

    def _as_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """A sharded parameter's local tensor (or its moments) as a DTensor of the full shape."""
        dim = self.tp.shard_dims.get(name)
        if dim is None:
            return local
        shape = list(local.shape)
        shape[dim] *= self.tp.size
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local.detach(), self.mesh, [Shard(dim)], run_check=False,
                                  shape=torch.Size(shape), stride=stride)
