"""Steps that go wrong: non-finite losses and gradients, loss spikes, and ranks that lag.

`StepGuard` decides whether an optimizer step is applied. It sees the step's global loss and
gradient norm, which every rank holds identically (both come out of collectives), so every rank
decides alike without another collective. A skipped step changes no weight and no optimizer moment;
the data position moves on. After `max_skipped` consecutive skips the run stops with an error: the
weights are those of the last good step, and so is every checkpoint.

The spike rule is OLMo's: skip when the loss exceeds mean + sigma x std of the last `window`
applied steps, once at least half the window is filled.

`Stragglers` turns every rank's step time (one all-gather of a scalar per step) into min / median /
max figures and warns about a rank that stays slower than `factor` x the median.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from meshtrain.accounting import Recorder
from meshtrain.core import comm


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many skipped steps); the message is one line."""


@dataclass
class StepGuard:
    max_skipped: int
    sigma: float = 0.0
    window: int = 128
    history: deque[float] = field(default_factory=deque)
    consecutive: int = 0
    skipped: int = 0
    last_reason: str = ""

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        """True to apply step `step` (1-based); False to skip it. Raises TrainingStopped past the limit."""
        reason = self._reason(loss, grad_norm)
        if reason is None:
            self.consecutive = 0
            self.history.append(loss)
            while len(self.history) > self.window:
                self.history.popleft()
            return True
        self.consecutive += 1
        self.skipped += 1
        self.last_reason = reason
        if self.consecutive > self.max_skipped:
            raise TrainingStopped(
                f"{self.consecutive} consecutive steps skipped (steps {step - self.consecutive + 1}-{step}; last: "
                f"{reason}) > resilience.max_skipped_steps={self.max_skipped}; the weights and checkpoints are "
                f"those of step {step - self.consecutive}: lower training.lr, or raise max_skipped_steps"
            )
        return False

    def _reason(self, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss {loss}"
        if not math.isfinite(grad_norm):
            return f"grad norm {grad_norm}"
        if self.sigma > 0 and len(self.history) >= max(2, self.window // 2):
            mean, std = statistics.fmean(self.history), statistics.pstdev(self.history)
            if loss > mean + self.sigma * std:
                return f"loss {loss:.4f} above mean + {self.sigma:g} std of the last {len(self.history)} ({mean:.4f} + {std:.4f})"
        return None


@dataclass
class Stragglers:
    world: int
    factor: float
    steps: int
    stats: Recorder
    group: dist.ProcessGroup | None = None
    """The ranks compared: the world, or one DiLoCo island (islands do not meet every step)."""
    streak: dict[int, int] = field(default_factory=dict)

    def gather(self, seconds: float) -> list[float]:
        """Every rank's step time (a collective: call on every rank of the group)."""
        mine = torch.tensor([seconds], dtype=torch.float64)
        if self.world == 1:
            return [seconds]
        out = torch.empty(self.world, dtype=torch.float64)
        comm.all_gather(out, mine, self.group, self.stats, counted=False)
        return out.tolist()

    def figures(self, times: list[float]) -> tuple[dict[str, float], str | None]:
        """Metrics, and a warning once a rank has been slower than factor x median for `steps` steps."""
        median = statistics.median(times)
        slowest = max(range(len(times)), key=times.__getitem__)
        out = {
            "step_time_min_s": min(times),
            "step_time_median_s": median,
            "step_time_max_s": max(times),
            "slowest_rank": slowest,
        }
        warning = None
        for rank, t in enumerate(times):
            slow = median > 0 and t > self.factor * median
            self.streak[rank] = self.streak.get(rank, 0) + 1 if slow else 0
            if self.streak[rank] == self.steps:
                warning = (
                    f"rank {rank} is a straggler: slower than {self.factor:g}x the median step time for "
                    f"{self.steps} steps ({t:.3f} s against {median:.3f} s)"
                )
        return out, warning
