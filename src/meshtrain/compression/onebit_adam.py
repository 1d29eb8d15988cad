"""1-bit Adam (Tang et al. 2021): Adam with a full gradient all-reduce for a warm-up, then a frozen
variance and a momentum communicated at one bit per element (compression.comm).

- Steps 1 .. freeze_step are AdamW's, bit for bit: the engine underneath all-reduces the gradients.
- From step freeze_step + 1 on, the gradients stay on their rank (`OneBitAdamEngine` turns the
  engine's reduction off). The loss is pre-divided by the global token count, so the ranks' local
  gradients sum to the global one: each rank feeds world x its gradient into its momentum (their
  mean is the global gradient), and the momenta are then averaged by the compressed all-reduce, so
  every rank holds the same momentum, hence the same parameters. The variance stays as it was at the
  freeze (and so does its bias correction).
- The gradient norm after the freeze (clipping and the step guard) is sqrt(world x sum over ranks of
  |local gradient|^2), the root mean square of what the ranks feed their momenta, from one uncounted
  scalar all-reduce: the same figure on every rank, and never below the true global norm
  (Cauchy-Schwarz), so clipping is never looser than AdamW's would have been.
- The state dict is AdamW's (exp_avg.NAME, exp_avg_sq.NAME, steps): checkpoints load into either
  optimizer. The error buffers are not saved: loading a checkpoint resets them (as DeepSpeed does),
  which costs one step's residual; they are per rank and sized by the data-parallel degree, which a
  resumed run may change.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshtrain.accounting import Recorder
from meshtrain.compression.comm import CompressedAllReduce
from meshtrain.config import OptimizerConfig
from meshtrain.core import comm
from meshtrain.core.engine import EngineDecorator, GradEngine
from meshtrain.optim import AdamW


class FreezeClock:
    """The optimizer's applied-step count, shared with the engine: both switch at the same step
    (a skipped step counts for neither)."""

    def __init__(self, freeze_step: int) -> None:
        self.freeze_step = freeze_step
        self.steps = 0

    @property
    def frozen(self) -> bool:
        """True once freeze_step steps have been applied: the next step is compressed."""
        return self.steps >= self.freeze_step


class OneBitAdam(AdamW):
    """AdamW until the clock freezes, then 1-bit Adam over `group` (the ranks the gradients were summed over)."""

    def __init__(
        self,
        named_params: list[tuple[str, torch.Tensor]],
        cfg: OptimizerConfig,
        no_decay: set[str],
        clock: FreezeClock,
        allreduce: CompressedAllReduce,
    ) -> None:
        self.clock = clock  # before AdamW's __init__, which sets `steps`
        super().__init__(named_params, cfg, no_decay)
        self.numel = sum(p.numel() for p in self.params)
        self.allreduce = allreduce
        # The momenta live in one padded flat buffer, which the compressed all-reduce reads and
        # writes whole; the padding stays zero.
        self.flat = torch.zeros(self.allreduce.padded, dtype=torch.float32, device=self.params[0].device)
        views, offset = [], 0
        for p in self.params:
            views.append(self.flat[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        self.exp_avg = views

    @property
    def steps(self) -> int:
        return self.clock.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.clock.steps = value

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        if not self.clock.frozen:
            super().step(grads, lr)
            return
        c = self.cfg
        self.steps += 1
        self._decay(lr)
        torch._foreach_mul_(self.exp_avg, c.beta1)
        torch._foreach_add_(self.exp_avg, grads, alpha=(1 - c.beta1) * self.allreduce.world)
        self.flat[: self.numel].copy_(self.allreduce(self.flat)[: self.numel])
        self._update(lr, self.steps, self.clock.freeze_step)

    def state_tensors(self) -> list[torch.Tensor]:
        return super().state_tensors() + self.allreduce.errors()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(sd)
        self.allreduce.reset()  # not saved: see the module docstring


class OneBitAdamEngine(EngineDecorator):
    """Around a plain data-parallel engine: once the clock is frozen, no gradient communication at
    all (the micro-steps never sync and finish() launches nothing), and the rank-consistent norm
    of the module docstring."""

    def __init__(self, inner: GradEngine, group: dist.ProcessGroup, stats: Recorder, freeze_step: int) -> None:
        super().__init__(inner)
        self.group, self.stats = group, stats
        self.world = dist.get_world_size(group)
        self.clock = FreezeClock(freeze_step)

    def set_sync(self, sync: bool) -> None:
        self.inner.set_sync(sync and not self.clock.frozen)

    def finish(self) -> None:
        if not self.clock.frozen:
            self.inner.finish()

    def grad_norm(self) -> torch.Tensor:
        if not self.clock.frozen:
            return self.inner.grad_norm()
        sq = self.inner.grad_norm().double().square()  # this rank's local gradient
        comm.all_reduce(sq, self.group, self.stats, counted=False)
        return (sq * self.world).sqrt()

    def optimizer(
        self, named_params: list[tuple[str, torch.Tensor]], cfg: OptimizerConfig, no_decay: set[str]
    ) -> OneBitAdam:
        """The optimizer that shares this engine's clock (built once the engine is fully decorated)."""
        numel = sum(p.numel() for _, p in named_params)
        return OneBitAdam(named_params, cfg, no_decay, self.clock, CompressedAllReduce(numel, self.group, self.stats))

    def describe(self) -> str:
        return (
            f"{self.inner.describe()}; 1-bit Adam over {self.world} ranks from step {self.clock.freeze_step + 1} "
            "(momentum sign-compressed, variance frozen, no gradient all-reduce)"
        )
