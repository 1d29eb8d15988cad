"""The timeline of DiLoCo's outer steps, plain, streaming and overlapped (docs/img/diloco-timeline.png).

The sync steps come from the runtime's own schedule (meshtrain.diloco.OuterSettings.fragment_at),
so the picture cannot drift from what the trainer does; only the drawing is here.

    python -m meshtrain.tools.diloco_diagram docs/img/diloco-timeline.png [--inner-steps 4 --steps 12]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from meshtrain.diloco import OuterSettings


@dataclass(frozen=True)
class Sync:
    step: int
    """The inner step after which the fragment's pseudo-gradient is formed and its mean launched."""
    fragment: int
    applied: int | None
    """The step after which that mean is applied: the same step, or (overlap) the fragment's next sync."""


def timeline(s: OuterSettings, steps: int) -> list[Sync]:
    syncs = [(t, f) for t in range(1, steps + 1) if (f := s.fragment_at(t)) is not None]
    out = []
    for i, (t, f) in enumerate(syncs):
        later = next((u for u, g in syncs[i + 1 :] if g == f), None)
        out.append(Sync(t, f, later if s.overlap else t))
    return out


VARIANTS: dict[str, tuple[int, bool]] = {  # title: (fragments, overlap)
    "DiLoCo": (1, False),
    "Streaming DiLoCo (2 fragments)": (2, False),
    "Overlapped DiLoCo (delay 1)": (1, True),
}
COLOURS = ("tab:red", "tab:purple")


def draw(path: str, inner_steps: int, steps: int, islands: int = 2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(VARIANTS), 1, figsize=(11, 2.1 * len(VARIANTS)), sharex=True)
    for ax, (title, (fragments, overlap)) in zip(axes, VARIANTS.items()):
        s = OuterSettings(inner_steps, 0.7, 0.9, "fp32", 2048, fragments, overlap, 0, steps)
        for k in range(islands):
            for t in range(steps):
                ax.add_patch(plt.Rectangle((t + 0.05, k + 0.15), 0.9, 0.7, color="tab:green", alpha=0.35))
        for i, sync in enumerate(timeline(s, steps)):
            colour = COLOURS[sync.fragment % len(COLOURS)]
            ax.axvline(sync.step, color=colour, lw=2.5)
            ax.text(sync.step + 0.08, islands + 0.05, f"f{sync.fragment}", color=colour, fontsize=8)
            if overlap:
                end = sync.applied if sync.applied is not None else steps
                lane = islands + 0.25 + 0.25 * (i % 2)  # consecutive rounds' means are in flight side by side
                ax.add_patch(plt.Rectangle((sync.step, lane), end - sync.step, 0.18, color=colour, alpha=0.35))
                if end - sync.step >= 2:
                    ax.text(
                        (sync.step + end) / 2, lane + 0.03, f"mean of round {i + 1} in flight", fontsize=7, ha="center"
                    )
                if sync.applied is not None:
                    ax.annotate("", (sync.applied, islands), (sync.applied, lane), arrowprops={"arrowstyle": "->"})
        ax.set_ylim(0, islands + 0.85)
        ax.set_yticks([k + 0.5 for k in range(islands)], [f"island {k}" for k in range(islands)])
        ax.set_title(title, fontsize=10, loc="left")
    axes[-1].set_xlabel(
        f"inner step (green: each island computes on its own; bars: outer syncs of fragment f, H = {inner_steps}; "
        "shaded: the mean in flight, applied at the arrow)",
        fontsize=8,
    )
    axes[-1].set_xlim(0, steps + 0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--inner-steps", type=int, default=4, help="H (default 4)")
    parser.add_argument("--steps", type=int, default=12, help="inner steps drawn (default 12)")
    args = parser.parse_args(argv)
    draw(args.out, args.inner_steps, args.steps)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
