"""Rendering: rich tables for people, plain dicts for --json."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from meshtrain.planner.evaluate import Plan
from meshtrain.planner.memory import device_total
from meshtrain.planner.sizing import chinchilla, kaplan

DAY = 86400.0


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_count(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def fmt_seconds(s: float) -> str:
    if s == 0:
        return "0 s"
    if s >= 1:
        return f"{s:.3g} s"
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def fmt_duration(s: float) -> str:
    """Training durations: days when long, hours or minutes when not."""
    if s >= DAY:
        return f"{s / DAY:.1f} d"
    return f"{s / 3600:.1f} h" if s >= 3600 else fmt_seconds(s) if s < 60 else f"{s / 60:.1f} min"


def days(plan: Plan, tokens: float) -> float:
    return tokens / plan.tokens_per_s / DAY if plan.tokens_per_s else math.inf


def plan_dict(plan: Plan, tokens: float) -> dict[str, Any]:
    lay = plan.layout
    return {
        "label": lay.label(),
        "layout": {k: getattr(lay, k) for k in lay.__dataclass_fields__},
        "fits": plan.fits,
        "memory_bytes": dict(plan.memory),
        "memory_total_bytes": plan.memory_total,
        "time_s": dict(plan.time),
        "step_time_s": plan.step_time,
        "tokens_per_s": plan.tokens_per_s,
        "mfu": plan.mfu,
        "hfu": plan.hfu,
        "model_flops_per_step": plan.model_flops,
        "days": days(plan, tokens),
    }


def ranked_table(plans: list[Plan], tokens: float, title: str) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in (
        "#",
        "layout",
        "ZeRO",
        "mb",
        "recompute",
        "memory",
        "step",
        "tokens/s",
        "MFU",
        f"time for {fmt_count(tokens)}",
    ):
        table.add_column(name, justify="left" if name in ("layout", "recompute") else "right", no_wrap=True)
    for i, p in enumerate(plans, 1):
        lay = p.layout
        zero = f"{lay.zero}" + ("+off" if lay.offload else "")
        table.add_row(
            str(i),
            lay.label(),
            zero,
            str(lay.micro_batch),
            lay.recompute,
            fmt_bytes(p.memory_total),
            fmt_seconds(p.step_time),
            fmt_count(p.tokens_per_s),
            f"{p.mfu:.1%}",
            fmt_duration(days(p, tokens) * DAY),
        )
    return table


def _terms_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("term")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


def breakdown_table(plan: Plan, usable: float) -> Table:
    """Memory terms and time terms of one plan side by side (zero terms left out)."""
    mem = [(k, fmt_bytes(v)) for k, v in plan.memory.items() if v]
    mem += [
        ("[bold]total on device[/]", f"[bold]{fmt_bytes(device_total(plan.memory))}[/]"),
        ("usable", fmt_bytes(usable)),
    ]
    tim = [(k, fmt_seconds(v)) for k, v in plan.time.items() if v]
    tim += [
        ("[bold]step[/]", f"[bold]{fmt_seconds(plan.step_time)}[/]"),
        ("MFU / HFU", f"{plan.mfu:.1%} / {plan.hfu:.1%}"),
    ]
    grid = Table.grid(padding=(0, 4))
    grid.add_row(_terms_table("memory / device", mem), _terms_table("step time", tim))
    return grid


def sizing_rows(budget: float) -> list[dict[str, Any]]:
    return [
        {"rule": s.rule, "params": s.params, "tokens": s.tokens, "flops": s.flops}
        for s in (chinchilla(budget), kaplan(budget))
    ]


def sizing_table(budget: float) -> Table:
    table = Table(title=f"compute-optimal size for {budget:.3g} FLOPs", title_justify="left", header_style="bold")
    for name in ("rule", "params", "tokens", "tokens/param"):
        table.add_column(name, justify="right" if name != "rule" else "left")
    labels = {"chinchilla": "Chinchilla (D = 20N)", "kaplan": "Kaplan 2020 (N ~ C^0.73)"}
    for row in sizing_rows(budget):
        table.add_row(
            labels[row["rule"]],
            fmt_count(row["params"]),
            fmt_count(row["tokens"]),
            f"{row['tokens'] / row['params']:.1f}",
        )
    return table


def predictions_table(pred: dict[str, Any]) -> Table:
    rows = [(k, f"{v:,.0f}") for k, v in pred.items() if k.startswith(("mem_", "comm_"))]
    return _terms_table("per-rank predictions for metrics.jsonl", rows)
