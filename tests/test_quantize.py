"""The compression module against formulas written here: error bounds of int8 and int4 absmax
quantization, their packing byte by byte, 1-bit signs keeping each block's norm, the wire bytes
(payload plus fp32 scales), and error feedback's telescoping sum."""

from __future__ import annotations

import math

import pytest
import torch

from meshtrain.core.quantize import ErrorFeedback, dequantize, quantize, sign_compress, sign_decompress

pytestmark = pytest.mark.pure


def _data(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    x[:64] = 0.0  # a whole zero block (block 64 below): scale 0, decoded as zeros
    return x


@pytest.mark.parametrize(("bits", "levels"), [(8, 127), (4, 7)])
def test_absmax_quantization_stays_within_half_a_step_of_each_block(bits: int, levels: int) -> None:
    x = _data(1000)  # 1000 = 15 blocks of 64 and one of 40
    c = quantize(x, bits, block=64)
    back = dequantize(c)
    assert back.shape == (1000,) and torch.equal(back[:64], torch.zeros(64))
    for b in range(16):
        part = x[b * 64 : (b + 1) * 64]
        step = part.abs().max() / levels
        assert float((back[b * 64 : (b + 1) * 64] - part).abs().max()) <= float(step) / 2 + 1e-6
    payload = 16 * 64 * (1 if bits == 8 else 0.5)
    assert c.wire_bytes() == payload + 4 * 16


def test_int4_packs_two_nibbles_per_byte_low_first() -> None:
    """q = -7, 7, 0, 1 (a block whose absmax is 7: scale 1) is stored as q + 8 = 1, 15, 8, 9."""
    c = quantize(torch.tensor([-7.0, 7.0, 0.0, 1.0]), bits=4, block=4)
    assert c.data.tolist() == [1 | 15 << 4, 8 | 9 << 4] and c.scales.tolist() == [1.0]
    assert dequantize(c).tolist() == [-7.0, 7.0, 0.0, 1.0]


def test_one_bit_signs_keep_each_blocks_norm() -> None:
    x = torch.randn(100, generator=torch.Generator().manual_seed(1))  # 12 blocks of 8 and one of 4
    c = sign_compress(x, block=8)
    back = sign_decompress(c)
    assert c.data.dtype == torch.uint8 and c.data.numel() == 13 and c.wire_bytes() == 13 + 4 * 13
    for b in range(13):
        part = x[b * 8 : (b + 1) * 8]
        assert torch.equal(torch.sign(back[b * 8 : (b + 1) * 8]), torch.where(part >= 0, 1.0, -1.0))
        assert float(back[b * 8 : (b + 1) * 8].norm()) == pytest.approx(float(part.norm()), rel=1e-6)
    # the first byte, bit i = element i non-negative
    assert int(c.data[0]) == sum(1 << i for i in range(8) if x[i] >= 0)


@pytest.mark.parametrize("bits", [8, 4, 1])
def test_error_feedback_telescopes(bits: int) -> None:
    """Over 20 steps the decoded values sum to the inputs' sum minus the last residual; without the
    feedback the loss accumulates instead."""
    inputs = [torch.randn(300, generator=torch.Generator().manual_seed(s)) * 0.1 for s in range(20)]
    fb, decoded = ErrorFeedback(bits, block=64), torch.zeros(300)
    for x in inputs:
        decoded += dequantize(fb.compress(x))
    assert fb.error is not None
    total = sum(inputs, torch.zeros(300))
    torch.testing.assert_close(decoded + fb.error, total, atol=1e-5, rtol=0)
    plain = sum(
        (dequantize(quantize(x, bits, 64)) if bits > 1 else sign_decompress(sign_compress(x, 64)) for x in inputs),
        torch.zeros(300),
    )
    assert (plain - total).norm() > 2 * (decoded - total).norm()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="int8"):
        quantize(torch.ones(4), bits=3)
    with pytest.raises(ValueError, match="must be even"):
        quantize(torch.ones(4), bits=4, block=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        sign_compress(torch.ones(4), block=12)
    assert math.isclose(float(dequantize(quantize(torch.full((5,), 2.5), 8, 4)).sum()), 12.5, rel_tol=1e-6)
