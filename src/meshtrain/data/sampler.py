"""Which sequences each data-parallel rank trains on at each step.

The sampler is a pure function of (seed, step): the global batch of step s is a slice of a seeded
permutation of the dataset, and DP rank r takes the r-th contiguous part of it. So the union over
ranks is the same global batch for every layout (which is what makes DP match one device), and the
position to resume from is just the step number stored in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class BatchSampler:
    n_sequences: int
    global_batch: int
    micro_batch: int
    dp_rank: int
    dp_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.n_sequences < self.global_batch:
            raise ValueError(
                f"the dataset holds {self.n_sequences} sequences, fewer than one global batch "
                f"({self.global_batch}); use more data or a smaller training.global_batch"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.n_sequences // self.global_batch

    def global_indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = _permutation(self.seed, epoch, self.n_sequences)
        return perm[k * self.global_batch : (k + 1) * self.global_batch].copy()  # a step's own, writable

    def rank_indices(self, step: int) -> np.ndarray:
        """(grad_accum, micro_batch) sequence indices for this rank at `step`."""
        per_rank = self.global_batch // self.dp_size
        mine = self.global_indices(step)[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return mine.reshape(-1, self.micro_batch)

    def state(self, step: int) -> dict[str, int]:
        return {
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "seed": self.seed,
            "sequences_consumed": step * self.global_batch,
        }


@lru_cache(maxsize=1)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The epoch's order, computed once per epoch rather than every step: the same values, but a
    corpus of billions of tokens has millions of sequences, whose shuffle takes seconds (read-only,
    since every step of the epoch shares it)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm
