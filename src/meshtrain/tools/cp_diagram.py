"""Which chunks of the sequence each cp rank holds, and which blocks of the causal attention matrix
it computes at each ring step, contiguous against zigzag (docs/img/context-parallel.png).

The roles are the runtime's (meshtrain.context_parallel.ring.ring_role); here they are only turned
into (query chunk, key chunk) pairs, in units of 2*cp chunks, so that both shardings share one grid.

    python -m meshtrain.tools.cp_diagram docs/img/context-parallel.png [--cp 4]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from meshtrain.context_parallel.ring import ring_role


@dataclass(frozen=True)
class Block:
    rank: int
    step: int
    q_chunk: int
    k_chunk: int
    """Chunk indices among 2*cp equal chunks of the sequence; q_chunk == k_chunk is a causal half."""


def chunks_of(size: int, rank: int, zigzag: bool) -> tuple[int, int]:
    """The two of 2*size chunks rank `rank` holds: r and 2size-1-r (zigzag), or 2r and 2r+1."""
    return (rank, 2 * size - 1 - rank) if zigzag else (2 * rank, 2 * rank + 1)


def ring_blocks(size: int, zigzag: bool) -> list[Block]:
    """Every (query chunk, key chunk) block each rank computes, with the ring step that computes it."""
    out: list[Block] = []
    for rank in range(size):
        mine = chunks_of(size, rank, zigzag)
        for step in range(size):
            theirs = chunks_of(size, (rank - step) % size, zigzag)
            role = ring_role(size, rank, step, zigzag)
            pairs = {
                "diagonal": [(q, k) for q in mine for k in mine if k <= q],
                "full": [(q, k) for q in mine for k in theirs],
                "keys_first_half": [(q, theirs[0]) for q in mine],
                "queries_second_half": [(mine[1], k) for k in theirs],
                "skip": [],
            }[role]
            out += [Block(rank, step, q, k) for q, k in pairs]
    return out


def work_per_rank(blocks: list[Block], size: int) -> list[float]:
    """Attention work of each rank in chunk-by-chunk blocks (a causal diagonal block is half of one)."""
    work = [0.0] * size
    for b in blocks:
        work[b.rank] += 0.5 if b.q_chunk == b.k_chunk else 1.0
    return work


def draw(size: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon, Rectangle

    colours = [plt.get_cmap("tab10")(i) for i in range(10)]
    n = 2 * size
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6))
    for ax, zigzag in zip(axes, (False, True)):
        blocks = ring_blocks(size, zigzag)
        for b in blocks:
            x, y, c = b.k_chunk, b.q_chunk, colours[b.rank % 10]
            if b.q_chunk == b.k_chunk:  # the causal half: the lower-left triangle of the cell
                ax.add_patch(Polygon([(x, y), (x, y + 1), (x + 1, y + 1)], closed=True, color=c, alpha=0.85))
            else:
                ax.add_patch(Rectangle((x, y), 1, 1, color=c, alpha=0.85))
            ax.text(
                x + 0.5 + (-0.2 if b.q_chunk == b.k_chunk else 0),
                y + 0.5 + (0.2 if b.q_chunk == b.k_chunk else 0),
                str(b.step),
                ha="center",
                va="center",
                fontsize=10,
            )
        for i in range(n + 1):
            ax.plot([0, n], [i, i], color="white", lw=1.5)
            ax.plot([i, i], [0, n], color="white", lw=1.5)
        holder = {c: r for r in range(size) for c in chunks_of(size, r, zigzag)}
        ax.set_xticks([i + 0.5 for i in range(n)], [f"k{i}\nr{holder[i]}" for i in range(n)], fontsize=8)
        ax.set_yticks([i + 0.5 for i in range(n)], [f"q{i} r{holder[i]}" for i in range(n)], fontsize=8)
        ax.set_xlim(0, n)
        ax.set_ylim(n, 0)
        ax.set_aspect("equal")
        work = work_per_rank(blocks, size)
        balance = max(work) / (sum(work) / size)
        name = "zigzag: rank r holds chunks r and 2cp-1-r" if zigzag else "contiguous: rank r holds chunk r"
        ax.set_title(
            f"{name}\nwork per rank {', '.join(f'{w:g}' for w in work)} blocks (max/mean {balance:.2f})", fontsize=10
        )
    handles = [Rectangle((0, 0), 1, 1, color=colours[r % 10]) for r in range(size)]
    fig.legend(handles, [f"rank {r}" for r in range(size)], loc="lower center", ncol=size, frameon=False)
    fig.suptitle(
        f"Ring attention over cp = {size}: who computes each block of the causal attention matrix (number: ring step)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--cp", type=int, default=4, help="context-parallel degree to draw (default 4)")
    args = p.parse_args()
    draw(args.cp, args.out)


if __name__ == "__main__":
    main()
