"""Attention on one block of queries against one block of keys, and merging partial results.

A ring step attends this rank's queries to one block of keys and values; the blocks' results are
combined with their log-sum-exps (LSE) exactly as if the attention had seen all keys at once:

    out <- out - sigmoid(lse_b - lse) * (out - out_b),    lse <- lse - logsigmoid(lse - lse_b)

in fp32 (the stable form of ring-flash-attention). The backward of a block takes the *final* out and
LSE: with them a block's probabilities P = exp(S - lse) are the full attention's, so the blocks'
gradients add up to the full attention's.

On CPU the fused flash op and its backward return what is needed (out and an fp32 LSE); elsewhere a
math version computes the same with explicit scores (one block's, never the whole sequence's).
Grouped-query attention: keys and values travel with their kv heads; each block expands them for
the kernel and sums the gradients back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _expand(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _fold(t: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of _expand: sum each kv head's query-head copies."""
    if groups == 1:
        return t
    b, h, s, d = t.shape
    return t.view(b, h // groups, groups, s, d).sum(2)


def _use_fused(q: torch.Tensor) -> bool:
    return q.device.type == "cpu"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and lower precisions; fp64 stays fp64 (the tight tests run in it)."""
    return torch.promote_types(dtype, torch.float32)


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """Scaled q k^T in the accumulation dtype, the future masked when `causal`."""
    acc = accumulation_dtype(q.dtype)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:  # top-left aligned, as the fused op: only square blocks are causal in a ring
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, -math.inf)
    return scores


def _math_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(q.dtype)
    scores = _scores(q, k, causal)
    lse = scores.logsumexp(-1)
    out = (scores - lse.unsqueeze(-1)).exp() @ v.to(acc)
    return out.to(q.dtype), lse


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's dtype, LSE in the accumulation dtype) of q (b, h, sq, d) against k, v (b, h_kv, sk, d)."""
    groups = q.shape[1] // k.shape[1]
    k, v = _expand(k, groups), _expand(v, groups)
    if _use_fused(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return out, lse.to(accumulation_dtype(q.dtype))
    return _math_forward(q, k, v, causal)


def _math_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = 1 / math.sqrt(q.shape[-1])
    acc = accumulation_dtype(q.dtype)
    qf, kf, vf, dof = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    p = (_scores(q, k, causal) - lse.unsqueeze(-1)).exp()
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    delta = (dof * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    return (ds @ kf).to(q.dtype), (ds.transpose(-1, -2) @ qf).to(k.dtype), dv.to(v.dtype)


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block for q, k, v (k, v with their kv heads), from the final out and LSE."""
    groups = q.shape[1] // k.shape[1]
    ke, ve = _expand(k, groups), _expand(v, groups)
    if _use_fused(q):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(),
            q,
            ke,
            ve,
            out.to(q.dtype).contiguous(),
            lse.to(accumulation_dtype(q.dtype)).contiguous(),
            0.0,
            causal,
        )
    else:
        dq, dk, dv = _math_backward(dout, q, ke, ve, out, lse, causal)
    return dq, _fold(dk, groups), _fold(dv, groups)


def merge(
    out: torch.Tensor | None, lse: torch.Tensor | None, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine a block's (out_b, lse_b) into the running (out, lse), kept in the accumulation dtype."""
    acc = accumulation_dtype(out_b.dtype)
    out_b, lse_b = out_b.to(acc), lse_b.to(acc)
    if out is None or lse is None:
        return out_b.clone(), lse_b.clone()
    out = out - torch.sigmoid(lse_b - lse).unsqueeze(-1) * (out - out_b)
    lse = lse - F.logsigmoid(lse - lse_b)
    return out, lse
