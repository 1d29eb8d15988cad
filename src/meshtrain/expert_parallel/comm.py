"""The all-to-alls expert parallelism needs, counted and logged by the communication layer.

Payload convention for the token exchanges (unequal splits): the rows of *this rank's own tokens*,
whichever way they travel: what it sends out in the dispatch, what comes back to it in the combine
(and the same for their gradients). That makes every rank's count T*k rows per exchange when
dropless, whatever the routing, so the planner can predict it exactly; the rows a rank serves for
others are the other ranks' counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshtrain.accounting import Recorder
from meshtrain.core import comm


def exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup, stats: Recorder) -> torch.Tensor:
    """(ep, E/ep) int64 tokens this rank sends to each rank's experts -> (ep, E/ep) tokens each rank sends to mine."""
    out = torch.empty_like(counts)
    comm.all_to_all(out, counts.contiguous(), group, stats)
    return out


def exchange_rows(
    x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup, stats: Recorder, own_rows_out: bool
) -> torch.Tensor:
    """send[i] rows of x to rank i, recv[i] rows from rank i. `own_rows_out`: x holds this rank's own
    tokens' rows (the dispatch); else they are what comes back (the combine)."""
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    own = x if own_rows_out else out
    comm.all_to_all(out, x, group, stats, out_splits=recv, in_splits=send, payload=own.numel() * own.element_size())
    return out
