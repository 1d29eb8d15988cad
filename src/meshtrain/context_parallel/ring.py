"""Ring attention over the cp group: keys and values travel the ring, queries stay.

Each rank holds its shard of every sequence. At ring step i it attends its queries to the block of
keys and values that started on rank (r - i) mod cp, while the next block is already in flight
(batch_isend_irecv: send to r + 1, receive from r - 1), and merges the result by LSE. Which part of
a block a step computes depends on the sharding (which global chunks each rank holds):

- contiguous (rank r holds chunk r of cp): step 0 is causal; a block from an earlier rank is
  attended in full; one from a later rank is all in the future and is skipped.
- zigzag (rank r holds chunks r and 2cp-1-r of 2cp, which balances causal work): step 0 is causal
  over the two local chunks; a block from an earlier rank: all queries against its first chunk
  (its second lies in the future of both local chunks); from a later rank: the second local chunk
  against the whole block (the first local chunk precedes it). No step is ever skipped.

Backward recomputes each block from the saved queries, keys, values and the final out and LSE (no
s x s matrix is kept), and sends the keys and values around again. Their gradients accumulate in
the accumulation dtype (fp32 or fp64) in a buffer that travels with the block and, after a last
hop, lands on the block's owner.

Exchanges per layer and microbatch: cp - 1 of keys and values forward; cp - 1 of keys and values
and cp of their gradients backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from meshtrain.accounting import Recorder
from meshtrain.context_parallel.comm import ring_exchange
from meshtrain.context_parallel.kernels import accumulation_dtype, block_backward, block_forward, merge


@dataclass(frozen=True)
class Ring:
    group: dist.ProcessGroup
    size: int
    rank: int
    zigzag: bool
    stats: Recorder

    def role(self, step: int) -> str:
        return ring_role(self.size, self.rank, step, self.zigzag)


def ring_role(size: int, rank: int, step: int, zigzag: bool) -> str:
    """What `rank` computes at ring step `step` (with the block that started on rank - step):
    'diagonal', 'full', 'keys_first_half', 'queries_second_half' or 'skip' (module docstring)."""
    if step == 0:
        return "diagonal"
    source = (rank - step) % size
    if zigzag:
        return "keys_first_half" if source < rank else "queries_second_half"
    return "full" if source < rank else "skip"


def _forward_step(
    ring: Ring,
    step: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    role, half = ring.role(step), q.shape[2] // 2
    if role in ("diagonal", "full"):
        return merge(out, lse, *block_forward(q, k, v, causal=role == "diagonal"))
    if role == "keys_first_half":
        return merge(out, lse, *block_forward(q, k[:, :, :half].contiguous(), v[:, :, :half].contiguous(), False))
    if role == "queries_second_half":
        if out is None or lse is None:
            raise RuntimeError("a ring step ran before the diagonal block")
        o2, l2 = merge(out[:, :, half:], lse[:, :, half:], *block_forward(q[:, :, half:].contiguous(), k, v, False))
        out, lse = out.clone(), lse.clone()
        out[:, :, half:], lse[:, :, half:] = o2, l2
    return out, lse


def _backward_step(
    ring: Ring,
    step: int,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dkv: torch.Tensor,
) -> None:
    """Add this step's block gradients to dq (this rank's queries) and dkv (the travelling block's)."""
    role, half = ring.role(step), q.shape[2] // 2
    if role in ("diagonal", "full"):
        gq, gk, gv = block_backward(dout, q, k, v, out, lse, causal=role == "diagonal")
        dq += gq
        dkv[0] += gk
        dkv[1] += gv
    elif role == "keys_first_half":
        gq, gk, gv = block_backward(dout, q, k[:, :, :half].contiguous(), v[:, :, :half].contiguous(), out, lse, False)
        dq += gq
        dkv[0, :, :, :half] += gk
        dkv[1, :, :, :half] += gv
    elif role == "queries_second_half":
        tail = [t[:, :, half:].contiguous() for t in (dout, q, out, lse)]
        gq, gk, gv = block_backward(tail[0], tail[1], k, v, tail[2], tail[3], False)
        dq[:, :, half:] += gq
        dkv[0] += gk
        dkv[1] += gv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> torch.Tensor:
        block = torch.stack([k, v]).contiguous()  # one message carries both
        out = lse = None
        for step in range(ring.size):
            incoming = ring_exchange(ring, [block]) if step < ring.size - 1 else None
            out, lse = _forward_step(ring, step, q, block[0], block[1], out, lse)
            if incoming is not None:
                (block,) = incoming.wait()
        if out is None or lse is None:
            raise RuntimeError("ring attention computed no block")
        # in q's dtype, laid out (b, s, h, d) in memory: the o_proj input is then a view of it, and
        # the output is saved once, as on one device (not the fp32 accumulator)
        final = out.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        ctx.save_for_backward(q, k, v, final, lse)
        ctx.ring = ring
        return final

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        ring: Ring = ctx.ring
        acc = accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        block = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(block.shape, dtype=acc, device=q.device)  # the gradient of the block held
        for step in range(ring.size):
            incoming = ring_exchange(ring, [block]) if step < ring.size - 1 else None
            _backward_step(ring, step, dout, q, block[0], block[1], out, lse, dq, dkv)
            (dkv,) = ring_exchange(ring, [dkv]).wait()  # on with its block; after the last hop, home
            if incoming is not None:
                (block,) = incoming.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> torch.Tensor:
    """Causal attention of this rank's query shard against the whole sequence's keys and values."""
    return _RingAttention.apply(q, k, v, ring)
