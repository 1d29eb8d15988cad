"""`meshtrain`: train, sample, plan layouts and draw pipeline schedules.

Every subcommand validates its input first and reports a problem as one line, `error: ...`, with a
non-zero exit and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meshtrain.config import ConfigError, add_config_arguments, dump_toml, load_config
from meshtrain.validate import validate

EPILOG = """examples:
  meshtrain train --config configs/default.toml --nproc 4
  meshtrain train --config configs/tiny.toml --nproc 2 --set training.steps=30 --run-dir runs/tiny
  torchrun --nproc-per-node 2 -m meshtrain.train --config configs/tiny.toml
  meshtrain generate --run-dir runs/tiny --prompt "def "
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
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    overrides = args.overrides + ([f"logging.run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = validate(load_config(args.config, overrides), args.nproc)
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "config.toml"
    resolved.write_text(dump_toml(cfg))
    from meshtrain.launch import launch

    return launch(resolved, args.nproc, args.max_restarts)


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a run's latest checkpoint",
        description="Load RUN_DIR/config.toml and the newest checkpoint, then sample.",
    )
    p.add_argument("--run-dir", required=True, help="folder of a finished or running `meshtrain train`")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from meshtrain.generate import load_for_generation, sample_text

    model, tok, step = load_for_generation(Path(args.run_dir))
    text = sample_text(
        model,
        tok,
        args.prompt,
        args.max_new_tokens,
        model.rope_cos.device,
        temperature=args.temperature,
        seed=args.seed,
    )
    print(f"# {args.run_dir} @ step {step}", file=sys.stderr)
    print(text)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshtrain", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train(sub)
    add_generate(sub)
    add_config_help(sub)
    from meshtrain.planner.cli import add_parser as add_plan
    from meshtrain.tools.schedule_cli import add_parser as add_schedule

    add_plan(sub)
    add_schedule(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
