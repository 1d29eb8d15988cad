"""Compression for communication: block-wise absmax int8 and int4, 1-bit signs, error feedback.

Everything works on a flat tensor of any length, cut into blocks of `block` elements (the last one
may be short; it is padded with zeros, which quantize to zero and are cut off again):

  int8   q = round(x / s), s = absmax(block) / 127, so |x - q*s| <= s/2 per element
  int4   the same with s = absmax / 7, q in [-7, 7], two values per byte (low nibble first,
         stored as q + 8 so that a byte holds two unsigned nibbles)
  1-bit  sign(x) packed eight per byte (1 = non-negative), one scale per block s = ||x||_2 / sqrt(n):
         the scaled signs keep each block's norm (1-bit Adam's compression)

A zero block gets scale 0 and decodes to zeros. Scales are fp32. `wire_bytes` is what a compressed
tensor puts on the wire, payload and scales: the figure a counted collective charges.

`ErrorFeedback` keeps what compression lost and adds it to the next input, so that over steps the
decoded sum equals the input sum minus the last residual (the telescoping property 1-bit Adam and
DeepSpeed's compressed all-reduce rely on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LEVELS = {8: 127, 4: 7}


@dataclass(frozen=True)
class Compressed:
    """A compressed flat tensor: its payload, one fp32 scale per block, and what to decode it to."""

    data: torch.Tensor
    """int8 values (bits 8), packed uint8 nibbles (bits 4) or packed uint8 signs (bits 1)."""
    scales: torch.Tensor
    numel: int
    block: int
    bits: int

    def wire_bytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """`x` flattened, zero-padded to whole blocks, as (blocks, block) in fp32."""
    if block < 1 or x.numel() == 0:
        raise ValueError(f"need a non-empty tensor and a block size of at least 1, not {x.numel()} and {block}")
    flat = x.detach().reshape(-1).float()
    n = math.ceil(flat.numel() / block) * block
    return torch.nn.functional.pad(flat, (0, n - flat.numel())).view(-1, block)


def quantize(x: torch.Tensor, bits: int = 8, block: int = 2048) -> Compressed:
    """Symmetric absmax quantization to int8 or int4 per block."""
    if bits not in LEVELS:
        raise ValueError(f"bits={bits}: int8 (8) or int4 (4)")
    if bits == 4 and block % 2:
        raise ValueError(f"int4 packs two values per byte: block size {block} must be even")
    rows, top = _blocks(x, block), LEVELS[bits]
    scales = rows.abs().amax(1) / top
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(rows / safe[:, None]).clamp_(-top, top).to(torch.int8)
    if bits == 8:
        return Compressed(q.reshape(-1), scales, x.numel(), block, 8)
    nibbles = (q + 8).to(torch.uint8).view(-1, 2)  # 1 .. 15, two per byte
    return Compressed(nibbles[:, 0] | (nibbles[:, 1] << 4), scales, x.numel(), block, 4)


def dequantize(c: Compressed) -> torch.Tensor:
    """The flat fp32 tensor `c` encodes."""
    if c.bits == 8:
        q = c.data.float()
    elif c.bits == 4:
        low, high = (c.data & 0x0F).to(torch.int16) - 8, (c.data >> 4).to(torch.int16) - 8
        q = torch.stack([low, high], 1).reshape(-1).float()
    else:
        return sign_decompress(c)
    return (q.view(-1, c.block) * c.scales[:, None]).reshape(-1)[: c.numel]


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def sign_compress(x: torch.Tensor, block: int = 2048) -> Compressed:
    """1 bit per element (its sign) and one scale per block, ||block||_2 / sqrt(elements in it)."""
    if block % 8:
        raise ValueError(f"signs pack eight per byte: block size {block} must be a multiple of 8")
    rows = _blocks(x, block)
    counts = torch.full((rows.shape[0],), float(block))
    counts[-1] = x.numel() - block * (rows.shape[0] - 1)  # the short last block's real elements
    scales = rows.norm(dim=1) / counts.sqrt()
    bits = (rows.reshape(-1, 8) >= 0).to(torch.uint8) * _BITS.to(rows.device)
    return Compressed(bits.sum(1, dtype=torch.uint8), scales, x.numel(), block, 1)


def sign_decompress(c: Compressed) -> torch.Tensor:
    bits = (c.data[:, None] & _BITS.to(c.data.device)) > 0
    signs = bits.reshape(-1, c.block).float() * 2 - 1
    return (signs * c.scales[:, None]).reshape(-1)[: c.numel]


def compress(x: torch.Tensor, bits: int, block: int) -> Compressed:
    return sign_compress(x, block) if bits == 1 else quantize(x, bits, block)


class ErrorFeedback:
    """Compress `x + error`, keep what was lost as the next error (per tensor, fp32, on x's device)."""

    def __init__(self, bits: int, block: int) -> None:
        self.bits, self.block = bits, block
        self.error: torch.Tensor | None = None

    def compress(self, x: torch.Tensor) -> Compressed:
        flat = x.detach().reshape(-1).float()
        corrected = flat if self.error is None else flat + self.error
        out = compress(corrected, self.bits, self.block)
        self.error = corrected - dequantize(out)
        return out

    def reset(self) -> None:
        self.error = None
