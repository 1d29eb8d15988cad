"""Turn the single-device model into this rank's part of the parallel model, in a fixed order.

The order matters and follows torchtitan's: (1) tensor parallelism rewrites the linear layers,
(2) activation checkpointing wraps whole blocks, so it sees the already-parallel block,
(3) data parallelism (plain or ZeRO) goes last, because it takes ownership of the parameters and
gradients that the earlier steps produced.
"""
from __future__ import annotations

import torch
from torch import nn

from meshtrain.accounting import CommStats
from meshtrain.activation_checkpoint import apply_activation_checkpointing
from meshtrain.config import Config
from meshtrain.data_parallel import DataParallel
from meshtrain.engine import GradEngine
from meshtrain.model import Llama
from meshtrain.pipeline.stage import StageChunks, stage_models
from meshtrain.tensor_parallel import LLAMA_PLAN, TensorParallelEngine, apply_tensor_parallel_parts
from meshtrain.topology import Topology
from meshtrain.zero import build_zero_engine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def llama_parts(model: nn.Module) -> list[Llama]:
    """The Llama instances a rank holds: the whole model, or its pipeline stages."""
    return stage_models(model)


def parallelize(model: nn.Module, topo: Topology, cfg: Config, stats: CommStats) -> GradEngine:
    """Apply every configured parallelism to `model` in place; return the gradient engine.

    `model` is a whole Llama, or a StageChunks of pipeline stages (pipelining is applied first, when
    the model is built, because it decides which modules exist on this rank at all).
    """
    t, p = cfg.training, cfg.parallel
    # Each pipeline stage is rewritten on its own; it holds a subset of the plan's modules (strict=False).
    tp = apply_tensor_parallel_parts(llama_parts(model), topo.group("tp"), LLAMA_PLAN, p.sequence_parallel, stats,
                                     strict=not isinstance(model, StageChunks)) if p.tp > 1 else None
    for part in llama_parts(model):
        apply_activation_checkpointing(part.model.layers, t.activation_checkpointing, t.ac_every)
    # ZeRO or plain DP owns this rank's (tp-local) parameters; TP's engine adds what tp changes on top
    if p.zero_stage:
        engine = build_zero_engine(model, topo, p, stats, DTYPES[t.dtype], DTYPES[p.reduce_dtype])
    else:
        engine = DataParallel(model, topo.group("dp"), stats, bucket_bytes=int(p.bucket_mb * 2**20),
                              reduce_dtype=DTYPES[p.reduce_dtype])
    return engine if tp is None else TensorParallelEngine(engine, model, tp)
