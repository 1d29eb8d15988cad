"""Worker entry point: `torchrun --nproc-per-node N -m meshtrain.train --config FILE [--set k=v ...]`.

`meshtrain train` starts this module in each process through torch's elastic launcher; an external
torchrun can start it directly. The config is validated again here against the real world size, so
a hand-launched run gets the same one-line errors.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from meshtrain.config import ConfigError, add_config_arguments, load_config
from meshtrain.distributed import init_distributed, shutdown
from meshtrain.preflight import preflight
from meshtrain.validate import validate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m meshtrain.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(p, "TOML config file")
    return p.parse_args(argv)


def _threads() -> None:
    # Several workers share the host's cores; oversubscribed BLAS threads slow everyone down.
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = load_config(args.config, args.overrides + ([f"logging.run_dir={args.run_dir}"] if args.run_dir else []))
        cfg = validate(cfg, world, int(os.environ.get("LOCAL_WORLD_SIZE", 0)))
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0:
            # an external launcher skips `meshtrain train`'s checks; a restart continues its own run
            preflight(cfg, world, overwrite=False)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _threads()
    from meshtrain.checkpoint import CheckpointError
    from meshtrain.resilience import TrainingStopped
    from meshtrain.trainer import Trainer  # heavy imports only once the config is known to be good

    # gloo's own timeout must outlast the watchdog's, which names the rank and collective
    env = init_distributed(cfg.training.device, timeout_s=max(300.0, cfg.resilience.collective_timeout_s + 120))
    try:
        trainer = Trainer(cfg, env)
    except ConfigError as e:  # what only the data can tell (no validation split in a data source): one line
        if env.rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(2)  # no teardown: the other ranks stop on the same error
    try:
        trainer.fit()
    except (CheckpointError, TrainingStopped) as e:
        if env.rank == 0 or isinstance(e, CheckpointError):
            print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # no teardown: the other ranks may be gone
    # A forward with collectives (ZeRO-3's gathers, TP) needs every rank: then all sample along (the same tokens).
    sampler = trainer.parallel.sampler
    if cfg.logging.sample_prompt and sampler is not None and (env.rank == 0 or trainer.engine.collective_forward):
        from meshtrain.generate import sample_text

        text = sample_text(
            sampler,
            trainer.tokenizer,
            cfg.logging.sample_prompt,
            cfg.logging.sample_tokens,
            env.device,
            seed=cfg.training.seed,
            # The sampler may be wrapped by a strategy (TP, ZeRO-3, EP) that the KV cache is not
            # tested under; the few tokens of this sample recompute their window instead.
            kv_cache=False,
        )
        if env.rank == 0:
            trainer.console.print("[bold]sample[/bold] " + repr(text)[:400], highlight=False)
    shutdown(hard_exit=world > 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
