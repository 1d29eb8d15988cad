"""`meshtrain`: train, evaluate, sample, plot runs, plan layouts and draw pipeline schedules.

Every subcommand validates its input first and reports a problem as one line, `error: ...`, with a
non-zero exit and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from meshtrain.config import ConfigError, add_config_arguments, dump_toml, load_config
from meshtrain.preflight import preflight
from meshtrain.rundir import set_aside
from meshtrain.validate import validate

EPILOG = """examples:
  meshtrain train --config configs/default.toml --nproc 4
  meshtrain train --config configs/tiny.toml --nproc 2 --set training.steps=30 --run-dir runs/tiny
  torchrun --nproc-per-node 2 -m meshtrain.train --config configs/tiny.toml
  meshtrain generate --run-dir runs/tiny --prompt "def "
  meshtrain eval --run-dir runs/tiny
  meshtrain plot --run-dir runs/tiny
  meshtrain lighthouse --port 29600   (DiLoCo islands launched separately join it: diloco.join)
"""


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on N local processes",
        description="Validate the config, write RUN_DIR/config.toml, then launch N workers "
        "(gloo on CPU, NCCL on CUDA) that train and write RUN_DIR/metrics.jsonl.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="every config key, its default and its meaning: `meshtrain config-help`",
    )
    add_config_arguments(p, "TOML file, e.g. configs/tiny.toml")
    p.add_argument("--nproc", type=int, default=1, help="number of local processes (the world size); default 1")
    p.add_argument("--max-restarts", type=int, default=0, help="elastic restarts after a worker failure")
    nodes = p.add_argument_group("several nodes (every node runs the same command, each with its --node-rank)")
    nodes.add_argument("--nnodes", type=int, default=1, help="nodes in the run; the world size is nnodes x nproc")
    nodes.add_argument("--node-rank", type=int, default=0, help="this node's index, 0 .. nnodes-1")
    nodes.add_argument("--master-addr", default="127.0.0.1", help="address of node 0, which hosts the rendezvous")
    nodes.add_argument("--master-port", type=int, default=29500, help="a free port on node 0 (default 29500)")
    p.add_argument(
        "--init-from-hf",
        metavar="DIR",
        help="start from a Hugging Face model folder (model.init_from=hf:DIR): its config, weights, tokenizer",
    )
    choice = p.add_mutually_exclusive_group()
    choice.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its newest checkpoint (checkpoint.resume=auto)",
    )
    choice.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a --run-dir that holds a run: its files move to RUN_DIR/replaced-<time>/",
    )
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    overrides = args.overrides + ([f"logging.run_dir={args.run_dir}"] if args.run_dir else [])
    overrides += ["checkpoint.resume=auto"] if args.resume else []
    overrides += ["checkpoint.resume=never"] if args.overwrite else []
    overrides += [f"model.init_from=hf:{args.init_from_hf}"] if args.init_from_hf else []
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts} must not be negative")
    _check_nodes(args)
    cfg = validate(load_config(args.config, overrides), args.nproc * args.nnodes, args.nproc)
    for warning in preflight(cfg, args.nproc, overwrite=args.overwrite):
        print(f"warning: {warning}", file=sys.stderr)
    run_dir = Path(cfg.logging.run_dir)
    if args.overwrite and (moved := set_aside(run_dir)) is not None:
        print(f"the previous run in {run_dir} is now in {moved}", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "config.toml"
    resolved.write_text(dump_toml(cfg))
    from meshtrain.launch import Nodes, launch  # torch's launcher: imported once the config is known to be good

    nodes = Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port) if args.nnodes > 1 else None
    cache = run_dir / "inductor-cache" if cfg.training.compile != "none" else None
    return launch(resolved, args.nproc, args.max_restarts, nodes, compile_cache=cache)


def _check_nodes(args: argparse.Namespace) -> None:
    if args.nnodes < 1 or args.nproc < 1:
        raise ConfigError(f"--nnodes {args.nnodes} and --nproc {args.nproc} must be at least 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise ConfigError(f"--node-rank {args.node_rank} must be in 0 .. --nnodes-1 = {args.nnodes - 1}")
    if not 0 < args.master_port < 65536:
        raise ConfigError(f"--master-port {args.master_port} is not a port number; give 1 .. 65535")


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a run's latest checkpoint",
        description="Load the newest checkpoint of RUN_DIR with the config it was trained with, then continue "
        "the prompt token by token. The text goes to stdout; the step and the speed (tokens/s) to stderr. "
        "Each token is drawn from the model's distribution after temperature, top-k and top-p; the same "
        "--seed gives the same text. Generation ends after --max-new-tokens, at the tokenizer's end-of-text "
        "token (a tokenizer.json's <|endoftext|>, </s>, <eos>, ...; the byte tokenizer has none) or at a --stop "
        "text. See docs/generation.md.",
    )
    p.add_argument("--run-dir", required=True, help="folder of a finished or running `meshtrain train`")
    p.add_argument("--prompt", default="", help="text to continue (default: none, start from token 0)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="most tokens to generate (default 100)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="softmax temperature: below 1 sharpens the distribution, above 1 flattens it; 0 always takes "
        "the most likely token (greedy; --top-k, --top-p and --seed then do nothing); default 0.8",
    )
    p.add_argument(
        "--top-k", type=int, default=40, help="draw among the K most likely tokens only; 0 = all (default 40)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: draw among the fewest most likely tokens whose probabilities add up to P, "
        "0 < P <= 1; applied after --top-k; default 1 (off)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end the text where TEXT first appears in the generated part (TEXT left out); repeat for several",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text (default 0)")
    p.add_argument(
        "--no-kv-cache",
        action="store_true",
        help="recompute the whole window for every token instead of reusing the cached keys and values "
        "(slower; for comparison)",
    )
    add_quantize_argument(p)
    p.set_defaults(func=run_generate)


def add_quantize_argument(p: argparse.ArgumentParser) -> None:
    """--quantize, shared by generate and eval (meshtrain.model.int8)."""
    p.add_argument(
        "--quantize",
        choices=("none", "int8", "absmax"),
        default="none",
        help="run the linear layers in int8: int8 = LLM.int8() (input columns with any |x| >= 6 in fp32), "
        "absmax = plain per-row x per-channel int8; the lm_head stays fp32 (default none)",
    )


def run_generate(args: argparse.Namespace) -> int:
    from meshtrain.generate import Sampling, generate, load_for_generation
    from meshtrain.model.int8 import apply_quantize, describe

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model, tok, step = load_for_generation(Path(args.run_dir))
    report = apply_quantize(model, args.quantize)  # None for --quantize none
    kv_cache = not args.no_kv_cache
    out = generate(
        model, tok, args.prompt, args.max_new_tokens, model.rope_cos.device, sampling, args.stop, kv_cache=kv_cache
    )
    print(f"# {args.run_dir} @ step {step}", file=sys.stderr)
    rate = out.new_tokens / out.seconds if out.seconds > 0 else 0.0
    print(
        f"# {out.new_tokens} tokens in {out.seconds:.2f} s: {rate:,.0f} tokens/s "
        f"({'kv cache' if kv_cache else 'no kv cache'}; ended by {out.stopped})",
        file=sys.stderr,
    )
    if report is not None:
        print(f"# {describe(report, model)}", file=sys.stderr)
    print(out.text)
    return 0


def add_config_help(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config-help", help="list every config key with its default and meaning")
    p.set_defaults(func=run_config_help)


def run_config_help(args: argparse.Namespace) -> int:
    from meshtrain.config import SECTIONS, field_docs

    for section, cls in SECTIONS.items():
        print(f"[{section}]")
        defaults = cls()
        for key, doc in field_docs(cls).items():
            print(f"  {key} = {getattr(defaults, key)!r:<14} {doc}")
    return 0


# Subcommands whose modules import torch: registered for real only when invoked, so that a config
# error from `meshtrain train` takes a fraction of a second, not the seconds torch's import takes.
LAZY = {
    "plan": ("meshtrain.planner.cli", "predict memory and step time; recommend a parallel layout"),
    "schedule": ("meshtrain.tools.schedule_cli", "simulate a pipeline-parallel schedule and report its bubble"),
    "export-hf": ("meshtrain.hf.cli", "write a run's checkpoint as a Hugging Face model folder"),
    "eval": ("meshtrain.evaluation", "validation loss and perplexity of a run's newest checkpoint"),
    "plot": ("meshtrain.tools.metrics_plot", "draw a run's loss, throughput, memory and traffic as PNGs"),
    "tokenizer": ("meshtrain.tools.tokenizer_cli", "train a byte-level BPE tokenizer (tokenizer.json) on a corpus"),
    "prepare-data": (
        "meshtrain.tools.prepare_data",
        "tokenize a corpus into memory-mapped token shards (data.source=tokens)",
    ),
    "bench-comm": (
        "meshtrain.tools.bench_comm",
        "time collectives over local ranks: time, algbw and busbw per op and size",
    ),
    "scaling": ("meshtrain.tools.scaling", "train an IsoFLOP grid here and fit Chinchilla's L(N, D)"),
    "lighthouse": (
        "meshtrain.tools.lighthouse",
        "host the rendezvous store of DiLoCo islands launched separately (diloco.join)",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshtrain", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train(sub)
    add_generate(sub)
    add_config_help(sub)
    for name, (module, summary) in LAZY.items():
        if name == command:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be made, a file that cannot be written: one line, no traceback
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
