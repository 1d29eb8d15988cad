"""Data parallelism: replicate the model, split the batch, sum gradients with overlapped buckets."""
from meshtrain.data_parallel.ddp import DataParallel

__all__ = ["DataParallel"]
