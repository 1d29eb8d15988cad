"""TeraPipe's bubble against microbatch pipelining at one long sequence (docs/img/terapipe-bubble.png).

The timelines are the simulator's (meshtrain.tools.simulator) over the built-in schedules, so the
picture is what `meshtrain schedule` reports; only the choice of panels is here. Costs are per
sequence (F = 1, BW = 2) and a slice costs 1/slices of it, the simulator's uniform model. GPipe
over whole sequences draws the same as 1F1B at one sequence, so it is left out.

    python -m meshtrain.tools.terapipe_diagram docs/img/terapipe-bubble.png [--pp 4 --sequences 1 --slices 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meshtrain.pipeline.schedules import build_schedule
from meshtrain.tools.plot import plot_schedules
from meshtrain.tools.simulator import Costs, SimResult, simulate


def panels(pp: int, sequences: int, slices: int) -> list[tuple[str, SimResult]]:
    """1F1B over whole sequences, then TeraPipe over their slices: (title, timeline) each."""
    costs = Costs(f=1.0, b=2.0, w=0.0)
    out = []
    for name, cut in (("1f1b", 1), ("terapipe", slices)):
        schedule, layout = build_schedule(name, pp, sequences, 1, cut)
        what = f"{sequences} sequence{'s' if sequences > 1 else ''}" + (f" in {cut} slices" if cut > 1 else "")
        out.append((f"{name}, pp={pp}, {what}", simulate(schedule, costs, layout)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=1)
    parser.add_argument("--slices", type=int, default=8)
    args = parser.parse_args(argv)
    plot_schedules(panels(args.pp, args.sequences, args.slices), args.out)


if __name__ == "__main__":
    main()
