"""Tokenizers, packed datasets, token shards and the distributed batch sampler.

- tokenizer.py     bytes by default, or a tokenizer.json file, each with an end-of-document id
- dataset.py       corpora (synthetic, stdlib, files, prepared tokens) packed into training sequences
- documents.py     text, .jsonl and .parquet files read as documents (tokenizer training, prepare-data)
- shard_writer.py  tokenized documents written as uint16/uint32 shards with a document index
- shards.py        the on-disk format of prepared token data, its checks, and np.memmap reads
- sampler.py       each data-parallel rank's micro-batches of a global batch, resumable by step

The names below are imported on first use (PEP 562), so that importing a torch-free submodule such
as `meshtrain.data.shards` (which config validation reads) does not import torch with the dataset.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshtrain.data.dataset import build_dataset
    from meshtrain.data.sampler import BatchSampler
    from meshtrain.data.tokenizer import build_tokenizer

_HOMES = {
    "BatchSampler": "meshtrain.data.sampler",
    "build_dataset": "meshtrain.data.dataset",
    "build_tokenizer": "meshtrain.data.tokenizer",
}
__all__ = ["BatchSampler", "build_dataset", "build_tokenizer"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'meshtrain.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
