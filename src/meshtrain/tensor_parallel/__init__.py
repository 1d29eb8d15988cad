"""Tensor parallelism (Megatron style) with optional sequence parallelism, applied from outside.

- plan.py    the plan as data (module-name patterns -> styles) and apply_tensor_parallel, which swaps
             modules and returns what it changed (sharded weights, the vocab-parallel loss, traffic)
- layers.py  column- and row-parallel linears, the vocab-parallel embedding and cross-entropy
- engine.py  the GradEngine decorator: norm over tp, SP's partial norm gradients, full-shape checkpoints
- comm.py    the region collectives (Megatron's f and g and SP's pairs) as counted autograd functions
"""

from meshtrain.tensor_parallel.engine import TensorParallelEngine
from meshtrain.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from meshtrain.tensor_parallel.plan import (
    LLAMA_PLAN,
    TensorParallel,
    apply_tensor_parallel,
    apply_tensor_parallel_parts,
)

__all__ = [
    "LLAMA_PLAN",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TensorParallel",
    "TensorParallelEngine",
    "VocabParallelEmbedding",
    "apply_tensor_parallel",
    "apply_tensor_parallel_parts",
    "vocab_parallel_cross_entropy",
]
