"""Data parallelism: replicate the model, split the batch, sum gradients with overlapped buckets.

- ddp.py   the engine: gradients live in flat buckets, all-reduced during backward
- comm.py  its one collective, counted
"""

from meshtrain.data_parallel.ddp import DataParallel

__all__ = ["DataParallel"]
