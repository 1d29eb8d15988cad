"""A key/value cache for incremental decoding with the single-device Llama.

Generation without a cache recomputes every key and value of the window for each new token. With
one, the prompt is run once (prefill) and each later forward gets only the new tokens (decode):
each block's attention appends the new keys and values after the cached ones and attends over all
of them. The cache is passed as `Llama.forward(tokens, cache=...)`; training never passes one.

Buffers are allocated on a block's first write, with the shape, dtype and device of what it writes:
grouped-query attention stores its n_kv_heads heads, not the query heads.

`SliceKV` is the training counterpart, for token-level pipelining (the terapipe schedule): a
sequence's slices run forward one after another, each attending to the keys and values of the
slices before it, and backward in reverse. Each slice's keys and values are kept twice: as computed
(in the autograd graph, for that slice's own backward) and detached as gradient leaves that later
slices attend to, so that their backwards leave the keys' and values' gradients on the leaves.
The slice's backward then runs from its output and its keys and values at once (`pop_slice`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LayerCache:
    """One block's keys and values, (b, n_kv_heads, max_len, head_dim), the first `owner.length` valid."""

    def __init__(self, owner: KVCache) -> None:
        self.owner = owner
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b, h_kv, s, d) after the cached prefix; return the prefix and them, (b, h_kv, length + s, d)."""
        start, end = self.owner.length, self.owner.length + k.shape[2]
        if self.keys is None or self.values is None:
            b, h, _, d = k.shape
            self.keys = k.new_empty(b, h, self.owner.max_len, d)
            self.values = v.new_empty(b, h, self.owner.max_len, d)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Every block's LayerCache, and how many positions they hold (the same for all blocks)."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.layers: dict[str, LayerCache] = {}

    def layer(self, name: str) -> LayerCache:
        if name not in self.layers:
            self.layers[name] = LayerCache(self)
        return self.layers[name]

    def reserve(self, n: int) -> range:
        """The positions of the next n tokens; an error if they do not fit (the rotary tables end there too)."""
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache holds {self.length} of {self.max_len} positions; {n} more do not fit")
        return range(self.length, self.length + n)

    def advance(self, n: int) -> None:
        """Count n more positions as cached; Llama.forward calls it once every block has stored them."""
        self.length += n

    def reset(self) -> None:
        """Forget every position; the buffers stay allocated and are overwritten by the next prefill."""
        self.length = 0


class SliceLayer(LayerCache):
    """One block's keys and values of a sequence's slices so far: as made, and as gradient leaves."""

    def __init__(self, owner: KVCache) -> None:
        super().__init__(owner)
        self.made: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.leaves: list[tuple[torch.Tensor, torch.Tensor]] = []

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep this slice's k, v (b, h_kv, s, d); return the earlier slices' leaves and them, concatenated."""
        keys = torch.cat([*(lk for lk, _ in self.leaves), k], dim=2)
        values = torch.cat([*(lv for _, lv in self.leaves), v], dim=2)
        self.made.append((k, v))
        self.leaves.append((k.detach().requires_grad_(), v.detach().requires_grad_()))
        return keys, values


class SliceKV(KVCache):
    """A training sequence's keys and values, slice by slice, for every block of a model (or stage).

    Pass it as `Llama.forward(slice_tokens, cache=kv)` for slices 0, 1, ... in order: positions
    continue from the slices before. Backward goes in reverse: `pop_slice` hands over the newest
    slice's keys and values with the gradients later slices left on them."""

    def __init__(self, max_len: int) -> None:
        super().__init__(max_len)
        self.slices: dict[str, SliceLayer] = {}

    def layer(self, name: str) -> SliceLayer:
        if name not in self.slices:
            self.slices[name] = self.layers[name] = SliceLayer(self)
        return self.slices[name]

    def pop_slice(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The newest slice's keys and values as made, and the gradients their leaves received (only
        those that have one: nothing attended to the last slice's), forgetting that slice."""
        made: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for block in self.slices.values():
            for tensor, leaf in zip(block.made.pop(), block.leaves.pop()):
                if leaf.grad is not None:
                    made.append(tensor)
                    grads.append(leaf.grad)
        return made, grads


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the s newest queries (b, h, s, d) on all L cached keys and values (b, h_kv, L, d).

    Query i sits at position L - s + i and may see keys 0 .. L - s + i. SDPA's is_causal=True aligns
    its mask top-left (query i sees keys 0 .. i), which is right only when nothing was cached before
    these queries; a query block after a prefix needs the mask aligned bottom-right, built here.
    """
    s, total = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if s == total:  # a prefill: the two alignments coincide
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # One query (a decode step) sees every key; no mask needed. A block of several needs one.
    mask = None if s == 1 else torch.ones(s, total, dtype=torch.bool, device=q.device).tril(total - s)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
