"""Gantt charts of simulated or traced pipeline timelines: one, or several stacked on one time axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshtrain.pipeline.schedules import Kind
from meshtrain.tools.simulator import SimResult

# Forward, input-gradient, weight-gradient and fused backward must read apart at a glance.
_BASE = {
    Kind.F: (0.22, 0.47, 0.80),
    Kind.B: (0.93, 0.55, 0.16),
    Kind.W: (0.30, 0.66, 0.35),
    Kind.BW: (0.62, 0.38, 0.72),
}


def _shade(kind: Kind, chunk: int, chunks: int) -> tuple[float, float, float]:
    """Later virtual chunks get lighter, so interleaved chunks stay distinguishable."""
    mix = 0.55 * chunk / chunks if chunks > 1 else 0.0
    return tuple(c + (1.0 - c) * mix for c in _BASE[kind])  # type: ignore[return-value]


def plot_schedule(result: SimResult, path: str | Path, title: str = "") -> Path:
    """Draw ranks as rows (rank 0 on top), one labelled block per compute action; idle stays blank.

    The format follows the suffix of ``path``: .png or .svg.
    """
    return plot_schedules([(title, result)], path)


def plot_schedules(results: list[tuple[str, SimResult]], path: str | Path) -> Path:
    """One chart per (title, result), stacked on a shared time axis so schedules compare by eye."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"plot path must end in .png or .svg (got {path.name!r})")
    # Imported here so schedules and the simulator work without matplotlib; Figure + Agg canvas
    # avoids pyplot's global backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    span = max(r.makespan for _, r in results) or 1.0
    heights = [0.55 * r.pp + 1.6 for _, r in results]
    fig = Figure(figsize=(min(max(8.0, 0.25 * span + 3.0), 20.0), sum(heights)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(results), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (title, result) in zip(axes, results):
        _draw(ax, result, title, span, fig.get_figwidth() * 72 * 0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _draw(ax: Any, result: SimResult, title: str, span: float, width_pts: float) -> None:
    from matplotlib.patches import Patch

    for s in result.spans:
        chunk = s.stage // result.pp
        ax.barh(
            s.rank,
            s.end - s.start,
            left=s.start,
            height=0.8,
            color=_shade(s.kind, chunk, result.chunks),
            edgecolor="white",
            linewidth=0.6,
        )
        # Only label blocks wide enough to hold the digits.
        if (s.end - s.start) / span * width_pts >= 6 * len(str(s.microbatch)):
            ax.text((s.start + s.end) / 2, s.rank, str(s.microbatch), ha="center", va="center", fontsize=7)
    order = list(_BASE)
    used = sorted({(s.kind, s.stage // result.pp) for s in result.spans}, key=lambda kc: (order.index(kc[0]), kc[1]))
    handles = [
        Patch(
            color=_shade(kind, chunk, result.chunks), label=f"{kind} chunk {chunk}" if result.chunks > 1 else str(kind)
        )
        for kind, chunk in used
    ]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25 if result.pp > 1 else -0.5),
        ncol=len(handles),
        frameon=False,
        fontsize=8,
    )
    ax.set_yticks(range(result.pp), [f"rank {r}" for r in range(result.pp)])
    ax.set_ylim(result.pp - 0.5, -0.5)
    ax.set_xlim(0, span)
    ax.set_xlabel("time")
    heading = f"{title} — " if title else ""
    ax.set_title(f"{heading}bubble {result.bubble_rate:.1%}, peak activations {result.peak:g}", fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
