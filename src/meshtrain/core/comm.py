"""The one communication layer: every collective a rank issues goes through here.

Around each torch.distributed call it does three things:
- counts the bytes in the run's CommStats (unless the call is bookkeeping: a loss or norm scalar);
- appends the call to this rank's log of recent collectives: a sequence number per group, the
  kind, the group, the bytes and the call site (file:line of the strategy code that issued it);
- marks the rank as waiting while it blocks on the call, so that the hang watchdog
  (meshtrain.watchdog) can say which collective each rank is in, or that it is in none.

Strategies keep their thin comm modules; those call these functions. Asynchronous calls return a
`TrackedWork` whose wait() is what marks the rank as waiting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from meshtrain.accounting import CollectiveLog, Entry, Recorder, group_ranks
from meshtrain.core.quantize import Compressed, compress, dequantize


class TrackedWork:
    """An asynchronous collective in flight; wait() blocks, marked in the log."""

    def __init__(self, work: dist.Work | None, entry: Entry, log: CollectiveLog) -> None:
        self.work, self.entry, self.log = work, entry, log

    def wait(self) -> None:
        if self.work is not None:
            with self.log.blocked(self.entry):
                self.work.wait()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _run(
    stats: Recorder,
    kind: str,
    group: dist.ProcessGroup | None,
    counted: float | None,
    nbytes: int,
    async_op: bool,
    call: Callable[[bool], dist.Work | None],
) -> TrackedWork:
    """Count (`counted` None: bookkeeping, not counted), log, issue, and block unless async."""
    if counted is not None:
        ranks = group_ranks(group)
        stats.record(kind, counted, len(ranks), ranks)
    entry = stats.log.issue(kind, group, nbytes)
    if async_op:
        return TrackedWork(call(True), entry, stats.log)
    with stats.log.blocked(entry):
        call(False)
    return TrackedWork(None, entry, stats.log)


def all_reduce(
    t: torch.Tensor,
    group: dist.ProcessGroup | None,
    stats: Recorder,
    *,
    payload: float | None = None,
    counted: bool = True,
    op: dist.ReduceOp | dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    async_op: bool = False,
) -> TrackedWork:
    """Reduce `t` in place. Counted: `payload` bytes (default: the tensor's), unless `counted` is
    False (bookkeeping: a loss or norm scalar)."""
    charge = (_nbytes(t) if payload is None else payload) if counted else None
    return _run(
        stats,
        "all_reduce",
        group,
        charge,
        _nbytes(t),
        async_op,
        lambda a: dist.all_reduce(t, op=op, group=group, async_op=a),
    )


def all_gather(
    out: torch.Tensor,
    inp: torch.Tensor,
    group: dist.ProcessGroup | None,
    stats: Recorder,
    *,
    payload: float | None = None,
    counted: bool = True,
    async_op: bool = False,
) -> TrackedWork:
    """Every rank's `inp` concatenated into `out` along dim 0. Counted: the gathered output (or `payload`)."""
    charge = (_nbytes(out) if payload is None else payload) if counted else None
    return _run(
        stats,
        "all_gather",
        group,
        charge,
        _nbytes(out),
        async_op,
        lambda a: dist.all_gather_single(out, inp, group=group, async_op=a),
    )


def reduce_scatter(
    out: torch.Tensor,
    inp: torch.Tensor,
    group: dist.ProcessGroup | None,
    stats: Recorder,
    *,
    payload: float | None = None,
    async_op: bool = False,
) -> TrackedWork:
    """The sum of every rank's `inp`, this rank's slice into `out`. Counted: the full input (or `payload`)."""
    charge = _nbytes(inp) if payload is None else payload
    return _run(
        stats,
        "reduce_scatter",
        group,
        charge,
        _nbytes(inp),
        async_op,
        lambda a: dist.reduce_scatter_single(out, inp, op=dist.ReduceOp.SUM, group=group, async_op=a),
    )


class TrackedBatch(TrackedWork):
    """A batch of point-to-point operations in flight; wait() waits for all of them."""

    def __init__(self, works: list[dist.Work], entry: Entry, log: CollectiveLog) -> None:
        super().__init__(None, entry, log)
        self.works = works

    def wait(self) -> None:
        with self.log.blocked(self.entry):
            for work in self.works:
                work.wait()


def exchange(
    sends: list[tuple[torch.Tensor, int]],
    recvs: list[tuple[torch.Tensor, int]],
    group: dist.ProcessGroup,
    stats: Recorder,
    async_op: bool = False,
) -> TrackedBatch:
    """Post point-to-point sends and receives (peers are ranks within `group`) as one batch and, unless
    `async_op`, wait for all. Counted: what is sent."""
    me = dist.get_rank()
    for t, peer in sends:
        stats.record("p2p", _nbytes(t), 2, (me, dist.get_global_rank(group, peer)))
    entry = stats.log.issue("p2p", group, sum(_nbytes(t) for t, _ in sends + recvs))
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer) for t, peer in recvs]
    batch = TrackedBatch(dist.batch_isend_irecv(ops) if ops else [], entry, stats.log)
    if not async_op:
        batch.wait()
    return batch


def all_to_all(
    out: torch.Tensor,
    inp: torch.Tensor,
    group: dist.ProcessGroup,
    stats: Recorder,
    *,
    out_splits: list[int] | None = None,
    in_splits: list[int] | None = None,
    payload: float | None = None,
) -> None:
    """Chunks of `inp` along dim 0 (equal, or `in_splits` rows) go to the group's ranks in order;
    `out` receives theirs (`out_splits` rows from each). Counted: `payload` bytes, by default what
    this rank holds before the exchange."""
    _run(
        stats,
        "all_to_all",
        group,
        _nbytes(inp) if payload is None else payload,
        _nbytes(inp),
        False,
        lambda a: dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=a),
    )


class CompressedGather:
    """A compressed all-gather in flight (`start_all_gather_compressed`); wait() decodes it."""

    def __init__(
        self, works: list[TrackedWork], data: torch.Tensor, scales: torch.Tensor, n: int, like: Compressed
    ) -> None:
        self.works, self.data, self.scales, self.n, self.like = works, data, scales, n, like

    def wait(self) -> torch.Tensor:
        """Every rank's tensor as decoded: a flat fp32 tensor of n x the input's length."""
        for work in self.works:
            work.wait()
        c, k, m = self.like, self.like.data.numel(), self.like.scales.numel()
        return torch.cat(
            [
                dequantize(
                    Compressed(
                        self.data[r * k : (r + 1) * k], self.scales[r * m : (r + 1) * m], c.numel, c.block, c.bits
                    )
                )
                for r in range(self.n)
            ]
        )


def start_all_gather_compressed(
    inp: torch.Tensor, group: dist.ProcessGroup, stats: Recorder, *, bits: int, block: int
) -> CompressedGather:
    """Launch the compressed all-gather of `all_gather_compressed` asynchronously."""
    n, c = dist.get_world_size(group), compress(inp, bits, block)
    data = torch.empty(n * c.data.numel(), dtype=c.data.dtype, device=c.data.device)
    scales = torch.empty(n * c.scales.numel(), dtype=c.scales.dtype, device=c.scales.device)
    works = [
        all_gather(data, c.data, group, stats, async_op=True),
        all_gather(scales, c.scales, group, stats, async_op=True),
    ]
    return CompressedGather(works, data, scales, n, c)


def all_gather_compressed(
    inp: torch.Tensor, group: dist.ProcessGroup, stats: Recorder, *, bits: int, block: int
) -> torch.Tensor:
    """Every rank's `inp` (the same length on each), compressed (core.quantize: int8, int4 or 1-bit,
    per-block fp32 scales), gathered and decoded: a flat fp32 tensor of n x inp.numel(). Counted at
    what it puts on the wire: the gathered payload and the gathered scales, two all-gathers."""
    return start_all_gather_compressed(inp, group, stats, bits=bits, block=block).wait()


def all_to_all_compressed(
    chunks: torch.Tensor, group: dist.ProcessGroup, stats: Recorder, *, bits: int, block: int
) -> torch.Tensor:
    """Row i of `chunks` (group size x m) goes to group rank i, each row compressed on its own;
    returns the rows received, decoded (group size x m, fp32). Counted at the compressed payload and
    scales this rank sends, two all-to-alls."""
    rows = [compress(row, bits, block) for row in chunks]
    data, scales = torch.cat([c.data for c in rows]), torch.cat([c.scales for c in rows])
    got_data, got_scales = torch.empty_like(data), torch.empty_like(scales)
    all_to_all(got_data, data, group, stats)
    all_to_all(got_scales, scales, group, stats)
    k, m = rows[0].data.numel(), rows[0].scales.numel()
    width = chunks.shape[1]
    return torch.stack(
        [
            dequantize(Compressed(got_data[i * k : (i + 1) * k], got_scales[i * m : (i + 1) * m], width, block, bits))
            for i in range(len(rows))
        ]
    )


def barrier(group: dist.ProcessGroup | None, stats: Recorder) -> None:
    """Bookkeeping: not counted as traffic."""
    entry = stats.log.issue("barrier", group, 0)
    with stats.log.blocked(entry):
        dist.barrier(group=group)
