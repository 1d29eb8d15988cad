"""AdamW over named tensors, and the learning-rate schedules.

Our own (rather than torch.optim.AdamW) for two reasons: its state is keyed by parameter name, so
torch.distributed.checkpoint can save and reshard it without index bookkeeping; and the same class
steps a flat ZeRO shard or a whole parameter alike. State is allocated eagerly so memory accounting
is exact from step 0 and a checkpoint can be loaded into it before the first step.
"""

from __future__ import annotations

import math

import torch

from meshtrain.config import OptimizerConfig, TrainingConfig


class AdamW:
    def __init__(
        self, named_params: list[tuple[str, torch.Tensor]], cfg: OptimizerConfig, no_decay: set[str] | None = None
    ) -> None:
        self.cfg = cfg
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        no_decay = no_decay or set()
        self.decay_mask = [n not in no_decay for n in self.names]
        self.exp_avg = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        c = self.cfg
        self.steps += 1
        self._decay(lr)
        torch._foreach_lerp_(self.exp_avg, grads, 1 - c.beta1)
        torch._foreach_mul_(self.exp_avg_sq, c.beta2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - c.beta2)
        self._update(lr, self.steps, self.steps)

    def _decay(self, lr: float) -> None:
        """Decoupled weight decay of the matrices, before the moments' update."""
        decayed = [p for p, d in zip(self.params, self.decay_mask) if d]
        if decayed and self.cfg.weight_decay:
            torch._foreach_mul_(decayed, 1 - lr * self.cfg.weight_decay)

    def _update(self, lr: float, mean_steps: int, variance_steps: int) -> None:
        """params -= lr * m_hat / (sqrt(v_hat) + eps), each moment bias-corrected for the steps it has seen."""
        c = self.cfg
        bc1 = 1 - c.beta1**mean_steps
        bc2 = 1 - c.beta2**variance_steps
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, c.eps)
        torch._foreach_addcdiv_(self.params, self.exp_avg, denom, -lr / bc1)

    def state_tensors(self) -> list[torch.Tensor]:
        return self.exp_avg + self.exp_avg_sq

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"steps": torch.tensor(self.steps)}
        for n, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq):
            out[f"exp_avg.{n}"] = m
            out[f"exp_avg_sq.{n}"] = v
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Tensors were loaded in place by torch.distributed.checkpoint; only the count is copied."""
        self.steps = int(sd["steps"])


def lr_at(step: int, t: TrainingConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the chosen decay."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    floor = t.lr * t.min_lr_ratio
    span = max(1, t.steps - 1 - t.warmup_steps)  # the last step (steps-1) lands on the floor
    progress = min(1.0, (step - t.warmup_steps) / span)
    if t.lr_schedule == "constant":
        return t.lr
    if t.lr_schedule == "cosine":
        return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = 1 - t.decay_fraction  # wsd: stable, then a linear decay over the last fraction
    if progress < decay_start:
        return t.lr
    return t.lr + (floor - t.lr) * (progress - decay_start) / max(t.decay_fraction, 1e-9)
