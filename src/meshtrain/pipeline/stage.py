"""Cutting the single-device model into pipeline stages.

Stage s (of pp * chunks virtual stages) is an ordinary `Llama` with the modules it does not own set
to None or dropped: the embedding lives on stage 0, the final norm and lm_head on the last stage.
Block names keep their global index, so a stage's parameters and its checkpoint keys are exactly
the single-device model's. Stages are built on the meta device and only their own part is
materialised and initialised, with the same name-keyed init as the full model.
"""

from __future__ import annotations

import torch

from meshtrain.config import ModelConfig
from meshtrain.model import Llama
from meshtrain.model.llama import Block


def block_costs(cfg: ModelConfig) -> list[float]:
    """Parameters per block, with the embedding charged to the first and the head to the last."""
    with torch.device("meta"):
        block = sum(p.numel() for p in Block(cfg).parameters())
    costs = [float(block)] * cfg.n_layers
    costs[0] += cfg.vocab_size * cfg.dim
    costs[-1] += cfg.dim + (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    return costs


def balanced_split(costs: list[float], parts: int) -> list[int]:
    """Blocks per part: contiguous, non-empty, minimising the most expensive part (exact DP)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for end in range(k, n - (parts - k) + 1):
            for start in range(k - 1, end):
                cost = max(best[k - 1][start], prefix[end] - prefix[start])
                if cost < best[k][end]:
                    best[k][end], cut[k][end] = cost, start
    sizes, end = [], n
    for k in range(parts, 0, -1):
        sizes.append(end - cut[k][end])
        end = cut[k][end]
    return sizes[::-1]


def split_blocks(cfg: ModelConfig, stages: int, how: str) -> list[int]:
    """Blocks per virtual stage from parallel.pp_split: 'params', 'uniform' or explicit '2,1,1'."""
    if how == "params":
        return balanced_split(block_costs(cfg), stages)
    if how == "uniform":
        return balanced_split([1.0] * cfg.n_layers, stages)
    return [int(x) for x in how.split(",")]


def describe_split(ranges: list[range]) -> str:
    return " | ".join(f"stage {s}: blocks {r.start}-{r.stop - 1}" for s, r in enumerate(ranges))


def stage_ranges(sizes: list[int]) -> list[range]:
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


def build_stage(cfg: ModelConfig, stage: int, blocks: range, n_stages: int, device: torch.device, seed: int) -> Llama:
    with torch.device("meta"):
        model = Llama(cfg)
    if stage > 0:
        model.model.embed_tokens = None
    if stage < n_stages - 1:
        model.model.norm = None
        model.lm_head = None
    for key in list(model.model.layers.keys()):
        if int(key) not in blocks:
            del model.model.layers[key]
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
