"""Symbolic pipeline simulator: timeline, idle time, bubble rate and activation memory of a schedule.

Cost convention: ``Costs.f``, ``.b`` and ``.w`` are the times of F, B and W for one microbatch on a
*full* rank-stage, as in the papers. With ``chunks = v`` virtual stages per rank each chunk costs
1/v of that, so every rank does ``m * (f + b + w)`` work whatever v is. BW costs ``b + w``.
Token slices (TeraPipe, `Layout.slices` = S) follow the same rule: a slice costs 1/S of its
microbatch. That uniform model ignores that a later slice's attention sees a longer prefix; it is
exact for the MLP and projections and a lower bound on the gain when attention dominates.

Timing model: an action starts when its rank is free and its inputs exist; an input produced on
another rank arrives ``comm`` later. Sends never stall the sender, so comm actions are zero-length
markers and the figures are those of an executor that overlaps communication perfectly.

Bubble rate: ``(makespan - m*(f+b+w)) / makespan`` for the built-in schedules. In general (traces,
unbalanced stages) it is the idle share of all rank-time, ``sum(idle) / (pp * makespan)``, which
is the same number when every rank does equal work.

Activation memory, in units of one microbatch's activations for a full stage: an F adds 1/v (1/(vS)
for a slice), the matching B or BW frees it (`peak_activations`, the convention of the ZB paper's M_B column). Because
W still needs part of that state, `peak_until_w` also reports the count when memory is freed only
at W; under it ZB-H1 still peaks at pp on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshtrain.pipeline.schedules import Kind, Layout, Schedule, dataflow_times, inherited


@dataclass(frozen=True)
class Costs:
    f: float = 1.0
    b: float = 1.0
    w: float = 1.0
    comm: float = 0.0

    def __post_init__(self) -> None:
        if min(self.f, self.b, self.w, self.comm) < 0:
            raise ValueError(f"costs must be non-negative (got F={self.f}, B={self.b}, W={self.w}, comm={self.comm})")

    @classmethod
    def parse(cls, text: str, comm: float = 0.0) -> Costs:
        """Read "F,B,W", e.g. "2,2,1"."""
        parts = text.split(",")
        try:
            f, b, w = (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"costs must be three numbers F,B,W such as 2,2,1 (got {text!r})") from None
        return cls(f, b, w, comm)

    @property
    def per_microbatch(self) -> float:
        return self.f + self.b + self.w

    def duration(self, kind: Kind, chunks: int = 1) -> float:
        full = {Kind.F: self.f, Kind.B: self.b, Kind.W: self.w, Kind.BW: self.b + self.w}.get(kind, 0.0)
        return full / chunks


@dataclass(frozen=True)
class Span:
    rank: int
    kind: Kind
    stage: int
    microbatch: int
    start: float
    end: float


@dataclass(frozen=True)
class SimResult:
    """A timeline (simulated or traced) and the figures derived from it; times start at 0."""

    pp: int
    chunks: int
    spans: tuple[Span, ...]
    makespan: float
    busy: tuple[float, ...]
    peak_activations: tuple[float, ...]
    peak_until_w: tuple[float, ...]
    slices: int = 1
    """Token slices per microbatch: a span's microbatch is then a unit (meshtrain.pipeline.schedules.Layout)."""

    @classmethod
    def from_spans(cls, spans: Iterable[Span], pp: int, chunks: int, slices: int = 1) -> SimResult:
        ordered = sorted(spans, key=lambda s: (s.rank, s.start, s.end))
        t0 = min((s.start for s in ordered), default=0.0)
        ordered = [Span(s.rank, s.kind, s.stage, s.microbatch, s.start - t0, s.end - t0) for s in ordered]
        makespan = max((s.end for s in ordered), default=0.0)
        busy = [0.0] * pp
        for s in ordered:
            busy[s.rank] += s.end - s.start
        share = chunks * slices  # what one action's activations are of a full stage's microbatch
        peaks, peaks_w = (_peaks(ordered, pp, share, frees) for frees in ({Kind.B, Kind.BW}, {Kind.W, Kind.BW}))
        return cls(pp, chunks, tuple(ordered), makespan, tuple(busy), peaks, peaks_w, slices)

    @property
    def idle(self) -> tuple[float, ...]:
        return tuple(self.makespan - b for b in self.busy)

    @property
    def bubble_time(self) -> float:
        """Makespan minus the average rank's work: (p-1)(f+b+w) for 1F1B."""
        return self.makespan - sum(self.busy) / self.pp

    @property
    def bubble_rate(self) -> float:
        return sum(self.idle) / (self.pp * self.makespan) if self.makespan > 0 else 0.0

    @property
    def span_idle(self) -> tuple[float, ...]:
        """Idle time between each rank's own first start and last end."""
        first, last = [self.makespan] * self.pp, [0.0] * self.pp
        for s in self.spans:
            first[s.rank], last[s.rank] = min(first[s.rank], s.start), max(last[s.rank], s.end)
        return tuple(max(0.0, hi - lo - b) for lo, hi, b in zip(first, last, self.busy))

    @property
    def steady_bubble(self) -> float:
        """The bubble if consecutive iterations could overlap (no flush): the worst span_idle."""
        return max(self.span_idle, default=0.0)

    @property
    def peak(self) -> float:
        return max(self.peak_activations, default=0.0)


def _peaks(spans: Sequence[Span], pp: int, share: int, frees: set[Kind]) -> tuple[float, ...]:
    live, top = [0.0] * pp, [0.0] * pp
    for s in spans:  # sorted by rank, then start: each rank's actions in execution order
        live[s.rank] += 1.0 / share if s.kind == Kind.F else -1.0 / share if s.kind in frees else 0.0
        top[s.rank] = max(top[s.rank], live[s.rank])
    return tuple(round(t, 9) for t in top)  # sums of 1/v drift in the last bits; callers compare exactly


def simulate(schedule: Schedule, costs: Costs = Costs(), layout: Layout | None = None) -> SimResult:
    """Time ``schedule`` under ``costs``; the layout is read off the schedule unless given. A token-sliced
    schedule (terapipe) needs its layout given: the actions alone do not say how many slices a unit is."""
    layout = layout or Layout.infer(schedule)
    share = layout.chunks * layout.slices
    times = dataflow_times(schedule, layout, lambda a: costs.duration(a.kind, share), costs.comm)
    spans = [
        Span(rank, a.kind, a.stage, a.microbatch, start, end)
        for rank, actions in enumerate(schedule)
        for a, (start, end) in zip(actions, times[rank])
        if not a.kind.is_comm
    ]
    return SimResult.from_spans(spans, layout.pp, layout.chunks, layout.slices)


def simulate_steps(
    steps: Sequence[Schedule], microbatches: int, costs: Costs | Sequence[Costs] = Costs(), carried: int = 0
) -> SimResult:
    """Time consecutive optimizer steps, each list starting once every rank has finished the last
    (the trainer's step-end collectives are a barrier). Microbatch id j of step k is the stream's
    (k - carried) * microbatches + j: `carried` 1 for 2BW's windows, whose ids 0..m-1 are the previous
    step's batch; compute a window needs from earlier steps counts as done before it starts.
    `costs` may be one per rank (unequal stages, e.g. measured from a trace); comm latency is rank 0's."""
    layout = Layout.infer(steps[-1])
    per_rank = [costs] * layout.pp if isinstance(costs, Costs) else list(costs)
    spans: list[Span] = []
    start = 0.0
    for k, schedule in enumerate(steps):
        times = dataflow_times(
            schedule,
            layout,
            lambda a: per_rank[layout.rank_of(a.stage)].duration(a.kind),
            per_rank[0].comm,
            inherited(schedule, layout),
        )
        shift = (k - carried) * microbatches
        spans += [
            Span(rank, a.kind, a.stage, a.microbatch + shift, start + t0, start + t1)
            for rank, actions in enumerate(schedule)
            for a, (t0, t1) in zip(actions, times[rank])
            if not a.kind.is_comm
        ]
        start = max((sp.end for sp in spans), default=start)
    return SimResult.from_spans(spans, layout.pp, 1)


def from_trace(
    records: Sequence[Sequence[tuple[str | Kind, int, int, float, float]]], chunks: int | None = None, slices: int = 1
) -> SimResult:
    """Build a result from a real run: per rank, (kind, stage, microbatch, start, end) records.

    Records of comm kinds (e.g. time spent in a RECV) are ignored: they count as idle. ``chunks``
    defaults to the number of distinct stages divided by the number of ranks.
    """
    spans = [
        Span(rank, Kind(kind), stage, mb, float(start), float(end))
        for rank, rows in enumerate(records)
        for kind, stage, mb, start, end in rows
        if not Kind(kind).is_comm
    ]
    if any(s.end < s.start for s in spans):
        raise ValueError("trace record ends before it starts")
    pp = len(records)
    if chunks is None:
        chunks = max(1, len({s.stage for s in spans}) // max(pp, 1))
    return SimResult.from_spans(spans, pp, chunks, slices)


@dataclass(frozen=True)
class Prediction:
    """A closed form from the papers and whether its assumptions hold for the given inputs.

    ``holds`` is about the makespan bubble; ``holds_steady`` about `SimResult.steady_bubble`, the
    measure under which the ZB paper calls ZB-H2 bubble-free when T_F = T_B = T_W.
    """

    bubble_time: float
    peak: float
    holds: bool
    holds_steady: bool
    assumption: str

    def bubble_rate(self, microbatches: int, costs: Costs) -> float:
        total = microbatches * costs.per_microbatch + self.bubble_time
        return self.bubble_time / total if total > 0 else 0.0


def closed_form(name: str, pp: int, microbatches: int, chunks: int, costs: Costs, slices: int = 1) -> Prediction:
    """Bubble time and rank-0 peak predicted for a built-in schedule (zero comm latency)."""
    p, m, v, c = pp, microbatches, chunks, costs
    flat = (p - 1) * c.per_microbatch
    ok = c.comm == 0
    if name in ("gpipe", "1f1b"):
        return Prediction(flat, m if name == "gpipe" else min(p, m), ok, ok, "comm = 0")
    if name == "terapipe":  # GPipe over m*S units of 1/S the cost: the fill and drain shrink S times
        return Prediction(flat / slices, m, ok, ok, "comm = 0, equal cost per slice")
    if name == "interleaved-1f1b":
        ok = ok and m % p == 0
        peak = p if v == 1 or m == p else round(p + (p - 1) / v, 9)
        return Prediction(flat / v, peak, ok, ok, "m % p == 0, comm = 0")
    if name == "zb-h1":
        ok = ok and m >= p and c.w <= c.f
        return Prediction(
            (p - 1) * (c.f + c.b - c.w),
            min(p, m),
            ok and c.w <= c.b,
            ok,
            "m >= p, T_W <= T_F, comm = 0, and for the makespan T_W <= T_B",
        )
    if name == "zb-h2":
        ok = ok and m >= 2 * p and c.w <= c.f
        # Below b = 2w the formula drops under (p-1)f, the time the last rank waits for its first F,
        # so only the per-rank (parallelogram) measure can reach it.
        return Prediction(
            (p - 1) * (c.f + c.b - 2 * c.w),
            min(2 * p - 1, m),
            ok and c.b >= 2 * c.w,
            ok and c.f + c.b >= 2 * c.w,
            "m >= 2p, T_W <= T_F, comm = 0, and T_B >= 2 T_W for the "
            "makespan (T_F + T_B >= 2 T_W for the steady state)",
        )
    if name == "zb-v":
        # Costs here are a full stage's, a chunk's are half: (p-1)(T_F + T_B - 2T_W) in chunk costs.
        # Only T_F = T_B gives that form: the V's turns then line up; otherwise simulate.
        ok = ok and m >= 2 * p - 1 and c.f == c.b and c.w <= c.f
        return Prediction(
            (p - 1) * (c.f + c.b - 2 * c.w) / 2,
            min(p, m),
            ok and c.b >= 2 * c.w,
            ok,
            "m >= 2p-1, T_F = T_B, T_W <= T_F, comm = 0, and T_B >= 2 T_W for the makespan (below it "
            "the last rank's start delay, (p-1) T_F/2, is the makespan bubble)",
        )
    raise ValueError(f"no closed form for schedule {name!r}")
