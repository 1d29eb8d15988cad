"""Tensor parallelism (Megatron style) with optional sequence parallelism, applied from outside."""
from meshtrain.tensor_parallel.engine import TensorParallelEngine
from meshtrain.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                              vocab_parallel_cross_entropy)
from meshtrain.tensor_parallel.plan import LLAMA_PLAN, TensorParallel, apply_tensor_parallel, apply_tensor_parallel_parts

__all__ = ["LLAMA_PLAN", "ColumnParallelLinear", "RowParallelLinear", "TensorParallel", "TensorParallelEngine",
           "VocabParallelEmbedding", "apply_tensor_parallel", "apply_tensor_parallel_parts",
           "vocab_parallel_cross_entropy"]
