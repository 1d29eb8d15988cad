"""Expert load across the ranks: the balancing bias's update and the routing metrics, once a step.

Each MoE layer counts what it routed during the step's forwards (meshtrain.model.moe.RoutingStats).
Before the optimizer step, `ExpertBalance.before_step` sums those counts, and the layers' balancing
losses and drops, over every rank that trained different tokens on the same experts (the dp x cp
group): one all-reduce of a float64 vector, counted as traffic. Under `load_balance = "bias"` it then
moves each layer's bias by rate * sign(mean load - load), re-centred to zero mean (DeepSeek-V3's
auxiliary-loss-free balancing, as torchtitan re-centres it). Doing this here, not in forward, keeps
gradient accumulation exact: the bias is constant within a step, whatever the number of micro-steps.

Evaluation's forwards (`outside_training`) are not counted: the load, the metrics and the bias are
training's alone. The biases are state: `state_dict` hands them to the checkpoint by their parameter-style names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from meshtrain.accounting import Recorder
from meshtrain.core import comm
from meshtrain.model.moe import MoE


class ExpertBalance:
    """The step hook for a rank's MoE layers (named as in the model: `model.layers.3.mlp`)."""

    def __init__(
        self, layers: dict[str, MoE], group: dist.ProcessGroup | None, stats: Recorder, mode: str, rate: float
    ) -> None:
        self.layers, self.group, self.stats = layers, group, stats
        self.mode, self.rate = mode, rate
        self.figures: dict[str, Any] = {}

    def before_step(self, applied: bool) -> None:
        """Sum the step's routing over the ranks, update the biases (only when the optimizer steps),
        keep the figures for the metrics and reset the counts."""
        rows = []
        for layer in self.layers.values():
            st = layer.stats
            counts = st.counts if st.counts is not None else torch.zeros(st.n_experts, dtype=torch.float64)
            extra = torch.tensor([st.dropped, st.assignments, st.aux_loss, st.z_loss], dtype=torch.float64)
            rows.append(torch.cat([counts.cpu(), extra]))
        total = torch.stack(rows)
        if self.group is not None:
            total = total.to(self._device())
            comm.all_reduce(total, self.group, self.stats)
            total = total.cpu()
        loads = total[:, :-4]
        if applied and self.mode == "bias":
            for layer, load in zip(self.layers.values(), loads):
                delta = self.rate * torch.sign(load.mean() - load)
                bias = layer.gate.e_score_correction_bias
                bias += (delta - delta.mean()).to(bias)
        mean = loads.mean(1).clamp_min(1e-12)
        self.figures = {
            "moe_aux_loss": float(total[:, -2].sum()),
            "moe_z_loss": float(total[:, -1].sum()),
            "moe_load_max_over_mean": float((loads.max(1).values / mean).max()),
            "moe_drop_fraction": float(total[:, -4].sum() / total[:, -3].sum().clamp_min(1)),
            "moe_expert_load": {name: [int(x) for x in load] for name, load in zip(self.layers, loads)},
        }
        for layer in self.layers.values():
            layer.stats.reset()

    @contextlib.contextmanager
    def outside_training(self) -> Iterator[None]:
        """Evaluation's forwards route tokens too; they must not count towards the load that moves the bias."""
        for layer in self.layers.values():
            layer.stats.paused = True
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.stats.paused = False

    def _device(self) -> torch.device:
        return next(iter(self.layers.values())).gate.weight.device

    def describe(self) -> str:
        return ""  # the model line of the summary already names the experts

    def start_step(self, step: int) -> int:
        return step

    def after_optimizer(self, step: int) -> bool:
        return False  # the biases moved in before_step; the optimizer's parameters are not the hook's

    def metrics(self) -> dict[str, Any]:
        return dict(self.figures)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.gate.e_score_correction_bias": m.gate.e_score_correction_bias for name, m in self.layers.items()
        }
