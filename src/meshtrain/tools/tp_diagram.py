"""Draw one block under tensor parallelism: plain, with sequence parallelism, and with async TP (docs/img).

python -m meshtrain.tools.tp_diagram docs/img/tensor-parallel.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

COLOURS = {"whole": "#d9d9d9", "seq": "#b7e1a1", "feat": "#9ecae1", "comm": "#fc9272", "ring": "#fdd0a2"}
LEGEND = {
    "whole": "whole (b, s, h) on every rank",
    "seq": "sequence shard (b, s/t, h)",
    "feat": "features / heads split t ways",
    "comm": "collective: forward / backward",
    "ring": "collective matmul: t ring steps",
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
    "+ async TP": [
        ("x", "seq"),
        ("RMS\nNorm", "seq"),
        ("q k v\nAG ring", "ring"),
        ("attention\nheads/t", "feat"),
        ("o\nRS ring", "ring"),
        ("+", "seq"),
        ("RMS\nNorm", "seq"),
        ("gate up\nAG ring", "ring"),
        ("SwiGLU", "feat"),
        ("down\nRS ring", "ring"),
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
    fig, ax = plt.subplots(figsize=(13, 4.5))
    for row, (title, cells) in enumerate(ROWS.items()):
        _row(ax, 1.3 * (1 - row), title, cells)
    legend = 1.3 * (2 - len(ROWS)) - 1.0
    for i, (kind, text) in enumerate(LEGEND.items()):
        x = i * 3.4
        ax.add_patch(FancyBboxPatch((x, legend), 0.35, 0.3, boxstyle="round,pad=0.02", fc=COLOURS[kind], ec="#555555"))
        ax.text(x + 0.5, legend + 0.15, text, va="center", fontsize=8)
    ax.text(
        0,
        2.45,
        "One block on one of t tensor-parallel ranks. AR all-reduce, AG all-gather, RS reduce-scatter.\n"
        "Under SP the column layers keep the sequence shard and all-gather it again in backward.\n"
        "Async TP multiplies each sequence chunk as it arrives (AG ring) and sums row products around the ring (RS ring).",
        fontsize=8.5,
        va="center",
    )
    ax.set_xlim(-2.6, 16.6)
    ax.set_ylim(legend - 0.2, 2.8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    draw(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img/tensor-parallel.png"))
