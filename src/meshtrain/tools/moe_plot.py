"""Expert load over training: one heat map per MoE layer (step x expert, share of the step's
tokens), read from a run's metrics.jsonl (`moe_expert_load`, summed over the ranks).

    python -m meshtrain.tools.moe_plot RUN_DIR [--out RUN_DIR/expert_load.png]

An even router shows a flat band at 1/n_experts; collapse shows as one or two bright rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_shares(records: list[dict]) -> dict[str, list[list[float]]]:
    """Per layer: for each step, each expert's share of that layer's assignments."""
    out: dict[str, list[list[float]]] = {}
    for rec in records:
        for layer, counts in rec.get("moe_expert_load", {}).items():
            total = sum(counts) or 1
            out.setdefault(layer, []).append([c / total for c in counts])
    return out


def draw(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = load_shares(records)
    if not shares:
        raise SystemExit("error: no moe_expert_load in these metrics; is it an MoE run (model.n_experts > 0)?")
    steps = [r["step"] for r in records if "moe_expert_load" in r]
    fig, axes = plt.subplots(len(shares), 1, figsize=(9, 1.2 + 1.6 * len(shares)), squeeze=False)
    for ax, (layer, rows) in zip(axes[:, 0], shares.items()):
        image = ax.imshow(
            list(map(list, zip(*rows))),
            aspect="auto",
            cmap="viridis",
            vmin=0,
            vmax=max(map(max, rows)),
            extent=(steps[0] - 0.5, steps[-1] + 0.5, len(rows[0]) - 0.5, -0.5),
            interpolation="nearest",
        )
        ax.set_ylabel(f"{layer}\nexpert", fontsize=8)
        fig.colorbar(image, ax=ax, label="share of tokens")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"Expert load ({len(rows[0])} experts; even = {1 / len(rows[0]):.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a meshtrain run folder (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, help="the PNG to write (default RUN_DIR/expert_load.png)")
    args = p.parse_args()
    records = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = args.out or args.run_dir / "expert_load.png"
    draw(records, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
