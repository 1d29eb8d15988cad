"""Draw one block under tensor parallelism, without and with sequence parallelism (docs/img).

python -m meshtrain.tools.tp_diagram docs/img/tensor-parallel.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

COLOURS = {"whole": "#d9d9d9", "seq": "#b7e1a1", "feat": "#9ecae1", "comm": "#fc9272"}
LEGEND = {
    "whole": "whole (b, s, h) on every rank",
    "seq": "sequence shard (b, s/t, h)",
    "feat": "features / heads split t ways",
    "comm": "collective: forward / backward",
}

# (label, kind) left to right; one row per mode
ROWS = {
    "tensor parallel": [
        ("x", "whole"),
        ("RMS\nNorm", "whole"),
        ("f\nid / AR", "comm"),
        ("q k v\ncolumn", "feat"),
        ("attention\nheads/t", "feat"),
        ("o\nrow", "feat"),
        ("g\nAR / id", "comm"),
        ("+", "whole"),
        ("RMS\nNorm", "whole"),
        ("f\nid / AR", "comm"),
        ("gate up\ncolumn", "feat"),
        ("SwiGLU", "feat"),
        ("down\nrow", "feat"),
        ("g\nAR / id", "comm"),
        ("+", "whole"),
    ],
    "+ sequence parallel": [
        ("x", "seq"),
        ("RMS\nNorm", "seq"),
        ("AG / RS", "comm"),
        ("q k v\ncolumn", "feat"),
        ("attention\nheads/t", "feat"),
        ("o\nrow", "feat"),
        ("RS / AG", "comm"),
        ("+", "seq"),
        ("RMS\nNorm", "seq"),
        ("AG / RS", "comm"),
        ("gate up\ncolumn", "feat"),
        ("SwiGLU", "feat"),
        ("down\nrow", "feat"),
        ("RS / AG", "comm"),
        ("+", "seq"),
    ],
}


def _row(ax: plt.Axes, y: float, title: str, cells: list[tuple[str, str]]) -> None:
    ax.text(-0.3, y + 0.35, title, ha="right", va="center", fontsize=10, weight="bold")
    for i, (label, kind) in enumerate(cells):
        x = i * 1.1
        ax.add_patch(FancyBboxPatch((x, y), 0.9, 0.7, boxstyle="round,pad=0.02", fc=COLOURS[kind], ec="#555555"))
        ax.text(x + 0.45, y + 0.35, label, ha="center", va="center", fontsize=7.5)
        if i:
            ax.annotate("", (x - 0.01, y + 0.35), (x - 0.19, y + 0.35), arrowprops=dict(arrowstyle="->", lw=0.8))


def draw(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(13, 3.4))
    for row, (title, cells) in enumerate(ROWS.items()):
        _row(ax, 1.3 * (1 - row), title, cells)
    for i, (kind, text) in enumerate(LEGEND.items()):
        x = i * 4.1
        ax.add_patch(FancyBboxPatch((x, -1.0), 0.35, 0.3, boxstyle="round,pad=0.02", fc=COLOURS[kind], ec="#555555"))
        ax.text(x + 0.5, -0.85, text, va="center", fontsize=8)
    ax.text(
        0,
        2.25,
        "One block on one of t tensor-parallel ranks. AR all-reduce, AG all-gather, RS reduce-scatter.\n"
        "Under SP the column layers keep the sequence shard and all-gather it again in backward.",
        fontsize=8.5,
        va="center",
    )
    ax.set_xlim(-2.6, 16.6)
    ax.set_ylim(-1.2, 2.5)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    draw(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img/tensor-parallel.png"))
