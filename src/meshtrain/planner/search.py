"""Enumerate the layouts a cluster can run, keep those that fit, rank them by step time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from meshtrain.planner.errors import PlanError
from meshtrain.planner.evaluate import Plan, Workload, evaluate
from meshtrain.planner.layout import KNOBS, Layout
from meshtrain.planner.report import fmt_seconds


@dataclass(frozen=True)
class SearchOptions:
    """Which axes to try; the defaults cover what Megatron-style stacks commonly run."""

    schedules: tuple[str, ...] = ("1f1b", "interleaved-1f1b")
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    recompute: tuple[str, ...] = ("none", "selective", "full")
    max_micro_batch: int = 16
    max_v: int = 8
    max_cp: int = 16
    min_cp_chunk: int = 4096
    """Smallest sequence slice per cp rank: context parallelism is for long sequences, and the
    time model does not see how short slices starve the attention kernels."""
    allow_offload: bool = False


@dataclass(frozen=True)
class SearchResult:
    ranked: list[Plan]
    """Layouts that fit, fastest first; ties go to the smaller Layout (Layout.sort_key)."""
    considered: int
    smallest: Plan | None
    """The layout needing the least memory, to explain an empty result."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pipeline_choices(ws: Workload, pp: int, opts: SearchOptions) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    out: list[tuple[str, int]] = []
    for schedule in opts.schedules:
        if schedule != "interleaved-1f1b":
            out.append((schedule, 1))
            continue
        # Megatron's interleaving needs the layers to split evenly into pp*v chunks
        out += [(schedule, v) for v in range(2, opts.max_v + 1) if ws.shape.n_layers % (pp * v) == 0]
    return out


def _model_parallel(ws: Workload, opts: SearchOptions) -> Iterator[tuple[int, int, int]]:
    """(tp, pp, cp): tp inside a node and dividing both head counts; pp <= layers."""
    shape, gpn = ws.shape, ws.cluster.gpus_per_node
    for tp in divisors(ws.n_gpus):
        if tp > gpn or shape.n_heads % tp or shape.n_kv_heads % tp:
            continue
        for pp in divisors(ws.n_gpus // tp):
            if pp > shape.n_layers:
                continue
            for cp in divisors(ws.n_gpus // (tp * pp)):
                if cp == 1 or (cp <= opts.max_cp and ws.seq_len % cp == 0 and ws.seq_len // cp >= opts.min_cp_chunk):
                    yield tp, pp, cp


def _data_parallel(ws: Workload, dp: int, inner: int, opts: SearchOptions) -> Iterator[tuple[int, int, int]]:
    """(zero stage, dp_replicate, dp_shard): stage 0 replicates everywhere; ZeRO shards over all
    of dp or over the part that stays in a node (HSDP), the two choices that matter in practice."""
    for zero in opts.zero_stages:
        if zero == 0:
            yield 0, 1, dp
            continue
        for shard in divisors(dp):
            if shard > 1 and (shard == dp or shard * inner <= ws.cluster.gpus_per_node):
                yield zero, dp // shard, shard


def enumerate_layouts(ws: Workload, opts: SearchOptions) -> Iterator[Layout]:
    """Every candidate layout, in a fixed order (the search must be reproducible)."""
    recomputes = [r for r in opts.recompute if not (r == "selective" and ws.attention == "flash")]
    for tp, pp, cp in _model_parallel(ws, opts):
        dp = ws.n_gpus // (tp * pp * cp)
        if ws.global_batch % dp:
            continue
        for zero, rep, shard in _data_parallel(ws, dp, tp * cp, opts):
            eps = [e for e in divisors(shard * cp) if ws.shape.n_experts % e == 0] if ws.shape.is_moe else [1]
            for ep in eps:
                for schedule, v in _pipeline_choices(ws, pp, opts):
                    for mb in divisors(ws.global_batch // dp):
                        m = ws.global_batch // (dp * mb)
                        if mb > opts.max_micro_batch or (schedule == "interleaved-1f1b" and m % pp):
                            continue
                        for rc in recomputes:
                            for off in (False, True) if opts.allow_offload and zero else (False,):
                                yield Layout(
                                    tp=tp,
                                    pp=pp,
                                    v=v,
                                    schedule=schedule,
                                    cp=cp,
                                    dp_replicate=rep,
                                    dp_shard=shard,
                                    ep=ep,
                                    zero=zero,
                                    micro_batch=mb,
                                    recompute=rc,
                                    sp=tp > 1,
                                    offload=off,
                                )


def _rank_key(plan: Plan) -> tuple[float, tuple[int | str | bool, ...]]:
    # nine significant digits absorb float noise so that ties fall to the layout order
    return float(f"{plan.step_time:.9g}"), plan.layout.sort_key()


def search(ws: Workload, opts: SearchOptions | None = None) -> SearchResult:
    opts = opts or SearchOptions()
    if ws.n_gpus < 1 or ws.global_batch < 1 or ws.seq_len < 1:
        raise PlanError("--gpus, --global-batch and --seq must be at least 1")
    fitting: list[Plan] = []
    smallest: Plan | None = None
    considered = 0
    for lay in enumerate_layouts(ws, opts):
        considered += 1
        probe = evaluate(ws, lay, memory_only=True)
        if probe.fits:
            fitting.append(evaluate(ws, lay))
        elif smallest is None or probe.memory_total < smallest.memory_total:
            smallest = probe
    fitting.sort(key=_rank_key)
    return SearchResult(fitting, considered, smallest)


def _same_time(a: Plan, b: Plan) -> bool:
    return abs(a.step_time - b.step_time) <= 1e-9 * max(a.step_time, b.step_time)


def _knobs(a: Layout, b: Layout) -> str:
    return ", ".join(f"{k} {getattr(a, k)} vs {getattr(b, k)}" for k in KNOBS if getattr(a, k) != getattr(b, k))


def explain(ranked: list[Plan]) -> str:
    """Why the first plan wins: the time terms that differ most from the first plan that is
    slower (ties are named, not explained: they differ only in knobs the model sees as equal)."""
    if not ranked:
        return "no layout fits."
    best = ranked[0]
    ties = [p for p in ranked[1:] if _same_time(best, p)]
    runner_up = next((p for p in ranked[1:] if not _same_time(best, p)), None)
    tie_note = f" {len(ties)} layout(s) tie with it (e.g. {_knobs(best.layout, ties[0].layout)})." if ties else ""
    if runner_up is None:
        return (
            f"{best.layout.label()} is the only layout that fits.{tie_note}"
            if not ties
            else f"All fitting layouts tie.{tie_note}"
        )
    gap = runner_up.step_time - best.step_time
    diffs = sorted((best.time[k] - runner_up.time.get(k, 0.0), k) for k in best.time)
    # the two terms where the best saves most, then the one where it pays most
    picked = [d for d in diffs if d[0] < -1e-9][:2] + [d for d in reversed(diffs) if d[0] > 1e-9][:1]
    terms = "; ".join(f"{k} {fmt_seconds(best.time[k])} vs {fmt_seconds(runner_up.time[k])}" for _, k in picked)
    return (
        f"{best.layout.label()} beats the next-fastest {runner_up.layout.label()} by {fmt_seconds(gap)}/step "
        f"({100 * gap / runner_up.step_time:.2g}%): {terms or 'equal terms'} (differs in "
        f"{_knobs(best.layout, runner_up.layout)}).{tie_note}"
    )
