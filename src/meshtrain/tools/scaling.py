"""`meshtrain scaling`: a measured IsoFLOP grid and a Chinchilla fit L(N, D) = E + A/N^alpha + B/D^beta.

For each compute budget C and each model of a small Llama family, train on D = C / (6N) tokens (N
counts the transformer blocks' parameters: no embedding, head or final norm, as Kaplan et al. count
it), record the loss on held-out text, fit the law to all points and print the compute-optimal
N*(C), D*(C) beside the published fits. Runs are in-process, on one device, one after another:
the same model, data, optimizer and learning-rate schedule as `meshtrain train`, without the
distributed machinery that one process does not need.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshtrain.config import ConfigError, DataConfig, ModelConfig, TrainingConfig
from meshtrain.model.math import from_model_config, param_breakdown
from meshtrain.planner.sizing import HOFFMANN, TOKENS_PER_PARAM, LossFit, kaplan

DEFAULT_BUDGETS = "3e10,1e11,3e11"
DEFAULT_SIZES = "4k,16k,55k,110k"
HEAD_DIM = 16
SEQ_LEN = 64
BATCH = 16  # sequences per step: 1024 tokens
VAL_SEQUENCES = 256
MIN_STEPS = 10


@dataclass(frozen=True)
class Point:
    """One run of the grid; loss is filled in once it has trained."""

    budget: float
    dim: int
    n_layers: int
    params: int  # N: non-embedding (block) parameters
    tokens: int  # D = steps x tokens per step, close to C / (6N)
    steps: int
    loss: float = math.nan


def family(dim: int) -> ModelConfig:
    """The family's model of width `dim`: depth grows with width (dim/32 layers, halves rounded up,
    at least 1)."""
    return ModelConfig(
        dim=dim,
        n_layers=max(1, (dim + 16) // 32),
        n_heads=dim // HEAD_DIM,
        n_kv_heads=dim // HEAD_DIM,
        vocab_size=256,
        max_seq_len=SEQ_LEN,
    )


def block_params(cfg: ModelConfig) -> int:
    return param_breakdown(from_model_config(cfg, SEQ_LEN))["blocks"]


def nearest_shape(target: float) -> ModelConfig:
    """The family member (widths 16, 32, ... 1024) whose N is nearest `target` in log distance."""
    shapes = [family(d) for d in range(16, 1025, 16)]
    return min(shapes, key=lambda c: abs(math.log(block_params(c) / target)))


def plan_grid(budgets: list[float], sizes: list[float], tokens_per_step: int = BATCH * SEQ_LEN) -> list[Point]:
    """Every (budget, size) pair: its shape, N, steps = round(C / (6N) / tokens_per_step), D."""
    shapes = [nearest_shape(n) for n in sizes]
    if len({c.dim for c in shapes}) < len(shapes):
        raise ConfigError(f"--sizes {sizes}: two sizes map to the same model width; give sizes further apart")
    points = []
    for c in budgets:
        for cfg in shapes:
            n = block_params(cfg)
            steps = round(c / (6 * n) / tokens_per_step)
            if steps < MIN_STEPS:
                raise ConfigError(
                    f"--budgets {c:g} gives the model of N = {n:,} only {steps} steps of {tokens_per_step} "
                    f"tokens; raise the budget or drop that size from --sizes (at least {MIN_STEPS} steps)"
                )
            points.append(Point(c, cfg.dim, cfg.n_layers, n, steps * tokens_per_step, steps))
    return points


def _lstsq(cols: list[list[float]], y: list[float]) -> tuple[list[float], float] | None:
    """Least squares y ~ cols @ w by the normal equations (Gauss-Jordan; a handful of columns)."""
    k = len(cols[0])
    g = [
        [sum(r[i] * r[j] for r in cols) for j in range(k)] + [sum(r[i] * v for r, v in zip(cols, y))] for i in range(k)
    ]
    for c in range(k):
        pivot = max(range(c, k), key=lambda r: abs(g[r][c]))
        if abs(g[pivot][c]) < 1e-12 * max(1.0, abs(g[c][c])):
            return None
        g[c], g[pivot] = g[pivot], g[c]
        for r in range(k):
            if r != c:
                f = g[r][c] / g[c][c]
                g[r] = [a - f * b for a, b in zip(g[r], g[c])]
    w = [g[i][k] / g[i][i] for i in range(k)]
    return w, sum((sum(a * b for a, b in zip(r, w)) - v) ** 2 for r, v in zip(cols, y))


# Which of (E, A, B) are free: all three, else the best with one or both power terms dropped
# (set to 0). Taking the best non-negative one of these is the exact non-negative least squares.
_SUBSETS = ((0, 1, 2), (0, 1), (0, 2), (0,))


def _solve(ns: list[float], ds: list[float], ls: list[float], alpha: float, beta: float) -> tuple[LossFit, float]:
    """E, A, B >= 0 by linear least squares for fixed exponents, and the squared error."""
    # Columns scaled to at most 1 keep the normal equations well conditioned (N^-alpha is tiny).
    sn, sd = min(ns) ** alpha, min(ds) ** beta
    full = [[1.0, sn / n**alpha, sd / d**beta] for n, d in zip(ns, ds)]
    best: tuple[LossFit, float] = (LossFit(math.nan, 0.0, 0.0, alpha, beta), math.inf)
    for keep in _SUBSETS:
        sol = _lstsq([[r[k] for k in keep] for r in full], ls)
        if sol is None or min(sol[0]) < 0 or sol[1] >= best[1]:
            continue
        w = dict(zip(keep, sol[0]))
        best = (LossFit(w[0], w.get(1, 0.0) * sn, w.get(2, 0.0) * sd, alpha, beta), sol[1])
    return best


def fit_law(ns: list[float], ds: list[float], ls: list[float]) -> tuple[LossFit, float]:
    """Fit L = E + A/N^alpha + B/D^beta by least squares on L itself (variable projection): for
    each (alpha, beta) on a grid over [0.02, 1.5]^2, E, A, B >= 0 are a linear problem; the best
    pair is then refined twice on a 10x finer grid around it. Returns the fit and its RMS residual."""
    if len(ls) < 5:
        raise ConfigError(f"the fit has 5 unknowns and {len(ls)} points; give more --budgets or --sizes")
    step = 0.02
    pairs = [(0.02 + i * step, 0.02 + j * step) for i in range(75) for j in range(75)]
    best = min((_solve(ns, ds, ls, a, b) for a, b in pairs), key=lambda f: f[1])
    for _ in range(2):
        a0, b0 = best[0].alpha, best[0].beta
        step /= 10
        pairs = [(a0 + i * step, b0 + j * step) for i in range(-10, 11) for j in range(-10, 11)]
        best = min([best] + [_solve(ns, ds, ls, a, b) for a, b in pairs if a > 0 and b > 0], key=lambda f: f[1])
    return best[0], math.sqrt(best[1] / len(ls))


@dataclass(frozen=True)
class Corpus:
    """Packed training and held-out sequences (torch tensors, imported only when training)."""

    train: Any
    val: Any


def load_corpus(max_tokens: int, seed: int) -> Corpus:
    """The Python standard library's source as bytes (data.source = stdlib), read once: its last
    2% of sequences held out. Byte-level code is learnable, so loss falls with N and D."""
    from meshtrain.data.dataset import held_out, token_stream
    from meshtrain.data.tokenizer import build_tokenizer

    data = DataConfig(source="stdlib", max_tokens=max_tokens, val_fraction=0.02)
    stream = token_stream(data, build_tokenizer("byte"), seed)
    return Corpus(held_out(stream, SEQ_LEN, 0.02, "train"), held_out(stream, SEQ_LEN, 0.02, "val"))


def train_point(point: Point, corpus: Corpus, lr: float, seed: int) -> float:
    """Train one model of the grid for point.steps steps; its mean loss on the held-out sequences."""
    import numpy as np
    import torch

    from meshtrain.config import OptimizerConfig
    from meshtrain.loss import cross_entropy_sum
    from meshtrain.model.llama import Llama
    from meshtrain.optim import AdamW, lr_at

    model = Llama(family(point.dim))
    model.init_weights(seed)
    named: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in model.named_parameters()]
    opt = AdamW(named, OptimizerConfig(), no_decay={n for n, p in named if p.ndim < 2})
    sched = TrainingConfig(steps=point.steps, lr=lr, warmup_steps=max(1, point.steps // 20), lr_schedule="cosine")
    # One fixed shuffle for every run: a run of D tokens sees a random D-token sample of the corpus,
    # and a larger D a superset of it. Past one epoch sequences repeat (plan_grid warns).
    order = np.random.default_rng(seed).permutation(len(corpus.train))
    for step in range(point.steps):
        idx = order[(np.arange(BATCH) + step * BATCH) % len(order)]
        x, y = corpus.train.batch(idx)
        loss = cross_entropy_sum(model(x), y) / y.numel()
        grads = torch.autograd.grad(loss, [p for _, p in named])
        torch.nn.utils.clip_grad_norm_(list(grads), 1.0)
        opt.step(list(grads), lr_at(step, sched))
    with torch.no_grad():
        n_val = min(VAL_SEQUENCES, len(corpus.val))
        total = sum(
            float(cross_entropy_sum(model(x), y))
            for x, y in (corpus.val.batch(np.arange(i, min(i + 64, n_val))) for i in range(0, n_val, 64))
        )
    return total / (n_val * SEQ_LEN)


def run_grid(points: list[Point], corpus: Corpus, lr: float, seed: int, log: Any = sys.stderr) -> list[Point]:
    done = []
    for i, p in enumerate(points):
        t0 = time.perf_counter()
        loss = train_point(p, corpus, lr, seed)
        done.append(Point(**{**asdict(p), "loss": loss}))
        print(
            f"# [{i + 1}/{len(points)}] C={p.budget:.0e} N={p.params:,} D={p.tokens:,}: loss {loss:.4f} "
            f"({time.perf_counter() - t0:.1f} s)",
            file=log,
        )
    return done


def frontier_rows(law: LossFit, budgets: list[float]) -> list[dict[str, float]]:
    """Per budget: our fit's N*, D*, D*/N* beside Hoffmann et al.'s fit, their 20 and Kaplan's."""
    rows = []
    for c in budgets:
        ours, theirs, kap = law.optimum(c), HOFFMANN.optimum(c), kaplan(c)
        rows.append(
            {
                "budget": c,
                "n_opt": ours.params,
                "d_opt": ours.tokens,
                "tokens_per_param": ours.tokens / ours.params,
                "hoffmann_fit_tokens_per_param": theirs.tokens / theirs.params,
                "chinchilla_tokens_per_param": TOKENS_PER_PARAM,
                "kaplan_tokens_per_param": kap.tokens / kap.params,
            }
        )
    return rows


def report(points: list[Point], law: LossFit, rms: float, budgets: list[float]) -> dict[str, Any]:
    def exponents(f: LossFit) -> dict[str, float]:  # N* ~ C^a, D* ~ C^b
        return {"a": f.beta / (f.alpha + f.beta), "b": f.alpha / (f.alpha + f.beta)}

    return {
        "points": [asdict(p) for p in points],
        "fit": {**asdict(law), "rms": rms, **exponents(law)},
        "hoffmann_fit": {**asdict(HOFFMANN), **exponents(HOFFMANN)},
        "kaplan": {"a": 0.73},
        "frontier": frontier_rows(law, budgets),
    }


def print_report(rep: dict[str, Any]) -> None:
    print(f"{'budget C':>10} {'dim x layers':>12} {'N':>9} {'D':>11} {'steps':>6} {'val loss':>9}")
    for p in rep["points"]:
        shape = f"{p['dim']} x {p['n_layers']}"
        print(
            f"{p['budget']:>10.1e} {shape:>12} {p['params']:>9,} {p['tokens']:>11,} {p['steps']:>6} {p['loss']:>9.4f}"
        )
    f, h = rep["fit"], rep["hoffmann_fit"]
    print(
        f"\nfit (least squares on L, {len(rep['points'])} points, RMS residual {f['rms']:.4f} nats):\n"
        f"  L(N, D) = {f['E']:.3f} + {f['A']:.4g} / N^{f['alpha']:.3f} + {f['B']:.4g} / D^{f['beta']:.3f}\n"
        f"  N* ~ C^{f['a']:.2f}, D* ~ C^{f['b']:.2f}   "
        f"(Hoffmann et al.: E=1.69 A=406.4 B=410.7 alpha=0.34 beta=0.28, N* ~ C^{h['a']:.2f}; "
        "Kaplan et al.: N* ~ C^0.73)"
    )
    print(
        f"\n{'budget C':>10} {'N*':>10} {'D*':>12} {'D*/N*':>8} {'Hoffmann fit':>13} {'Chinchilla':>11} {'Kaplan':>9}"
    )
    for r in rep["frontier"]:
        print(
            f"{r['budget']:>10.1e} {r['n_opt']:>10,.0f} {r['d_opt']:>12,.0f} {r['tokens_per_param']:>8.1f} "
            f"{r['hoffmann_fit_tokens_per_param']:>13.1f} {r['chinchilla_tokens_per_param']:>11.0f} "
            f"{r['kaplan_tokens_per_param']:>9.3g}"
        )


def plot(rep: dict[str, Any], path: Path) -> None:
    """IsoFLOP curves (loss against N per budget, the fit's curve and minimum) and the frontier N*(C)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law = LossFit(*(rep["fit"][k] for k in ("E", "A", "B", "alpha", "beta")))
    budgets = sorted({p["budget"] for p in rep["points"]})
    fig, (iso, front) = plt.subplots(1, 2, figsize=(11, 4.5))
    for c, colour in zip(budgets, plt.get_cmap("viridis")([i / max(1, len(budgets)) for i in range(len(budgets))])):
        mine = [p for p in rep["points"] if p["budget"] == c]
        iso.plot([p["params"] for p in mine], [p["loss"] for p in mine], "o", color=colour, label=f"C = {c:.0e}")
        lo, hi = min(p["params"] for p in mine) / 2, max(p["params"] for p in mine) * 2
        ns = [lo * (hi / lo) ** (i / 60) for i in range(61)]
        iso.plot(ns, [law.loss(n, c / (6 * n)) for n in ns], "-", color=colour, alpha=0.7)
        opt = law.optimum(c)
        iso.plot([opt.params], [law.loss(opt.params, opt.tokens)], "*", color=colour, markersize=14, mec="k")
    iso.set_xscale("log")
    iso.set_xlabel("N, non-embedding parameters")
    iso.set_ylabel("held-out loss (nats / byte)")
    iso.set_title("IsoFLOP curves: measured (dots), fit (lines), fitted minimum (star)")
    iso.legend()
    cs = [budgets[0] / 3 * (budgets[-1] * 9 / budgets[0]) ** (i / 40) for i in range(41)]
    front.plot(cs, [law.optimum(c).params for c in cs], "-", label=f"this fit: N* ~ C^{rep['fit']['a']:.2f}")
    front.plot(cs, [HOFFMANN.optimum(c).params for c in cs], "--", label="Hoffmann et al. fit (C^0.45)")
    front.plot(cs, [math.sqrt(c / (6 * TOKENS_PER_PARAM)) for c in cs], ":", label="Chinchilla D = 20 N (C^0.5)")
    front.plot(cs, [kaplan(c).params for c in cs], "-.", label="Kaplan et al. (C^0.73)")
    front.plot(budgets, [law.optimum(c).params for c in budgets], "*", color="k", markersize=10, label="fitted N*")
    best = [min((p for p in rep["points"] if p["budget"] == c), key=lambda p: p["loss"])["params"] for c in budgets]
    front.plot(budgets, best, "o", mfc="none", color="k", label="best measured size")
    front.set_xscale("log")
    front.set_yscale("log")
    front.set_xlabel("compute C = 6ND (FLOPs)")
    front.set_ylabel("compute-optimal N*")
    front.set_title("frontier")
    front.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _numbers(text: str, flag: str) -> list[float]:
    """'3e10,1e11' or '16k,55k' (k and M suffixes) as floats; a bad entry is a one-line error."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        scale = {"k": 1e3, "K": 1e3, "M": 1e6}.get(item[-1], 1.0)
        try:
            value = float(item[:-1] if scale != 1.0 else item) * scale
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: {item!r} is not a number; give e.g. {flag} 1e11,3e11") from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{flag} {text!r}: {item!r} must be a positive number")
        out.append(value)
    if not out:
        raise ConfigError(f"{flag} is empty; give a comma-separated list")
    return out


_DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else ""


def add_parser(subparsers: Any) -> None:
    """Register the `scaling` subcommand (meshtrain.cli's LAZY table)."""
    p = subparsers.add_parser(
        "scaling",
        help="train an IsoFLOP grid here and fit Chinchilla's L(N, D)",
        description=_DESCRIPTION,
        epilog="example: meshtrain scaling --out scaling.png   (about 3 minutes on 2 cores; docs/planner.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"FLOP budgets C (default {DEFAULT_BUDGETS})")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"non-embedding parameter counts N (default {DEFAULT_SIZES})")
    p.add_argument("--nproc", type=int, default=1, help="processes per run; only 1 (in-process, one device)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of every run (default 3e-3)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=13_000_000,
        help="corpus tokens read (default 13M: no run of the default grid repeats data)",
    )
    p.add_argument("--seed", type=int, default=1234, help="init and data-order seed (default 1234)")
    p.add_argument("--out", help="draw the IsoFLOP curves and the frontier into this PNG")
    p.add_argument("--json", action="store_true", help="print the points, the fit and the frontier as JSON")
    p.add_argument("--run-dir", help="also write the report there as scaling.json")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    if args.nproc != 1:
        raise ConfigError(f"--nproc {args.nproc}: the grid trains in-process on one device; give --nproc 1")
    budgets, sizes = _numbers(args.budgets, "--budgets"), _numbers(args.sizes, "--sizes")
    points = plan_grid(budgets, sizes)
    if len(points) < 5:
        raise ConfigError(f"{len(points)} grid points for a fit of 5 unknowns; give more --budgets or --sizes")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only add contention (10x slower on 2 loaded cores)
    t0 = time.perf_counter()
    try:
        corpus = load_corpus(args.max_tokens, args.seed)
        if max(p.tokens for p in points) > len(corpus.train) * SEQ_LEN:
            print(
                f"warning: some runs see more than the {len(corpus.train) * SEQ_LEN:,} training tokens", file=sys.stderr
            )
        done = run_grid(points, corpus, args.lr, args.seed)
    finally:
        torch.set_num_threads(threads)
    law, rms = fit_law([p.params for p in done], [p.tokens for p in done], [p.loss for p in done])
    rep = report(done, law, rms, budgets)
    rep["seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print_report(rep)
        print(f"\n# {len(done)} runs in {rep['seconds']:.0f} s")
    if args.run_dir:
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.run_dir) / "scaling.json").write_text(json.dumps(rep, indent=1))
    if args.out:
        plot(rep, Path(args.out))
        print(f"# plot: {args.out}", file=sys.stderr)
    return 0
