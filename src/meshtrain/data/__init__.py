"""Tokenizers, packed datasets and the distributed batch sampler."""

from meshtrain.data.dataset import build_dataset
from meshtrain.data.sampler import BatchSampler
from meshtrain.data.tokenizer import build_tokenizer

__all__ = ["BatchSampler", "build_dataset", "build_tokenizer"]
