"""Validation of pipeline layouts (schedules, chunks, token slices, PipeDream-2BW, custom CSV
schedules): cross-field checks run before any process is spawned, part of meshtrain.validate.

Each check raises `ConfigError` with one line: the fields, their values and what to change.
"""

from __future__ import annotations

from meshtrain.config import Config, ConfigError, ParallelConfig
from meshtrain.pipeline.schedules import (
    SLICED,
    TWO_BW,
    V_SHAPED,
    ScheduleError,
    build_schedule,
    is_custom,
)
from meshtrain.tools.schedule_check import validate_schedule


def check_pipeline(cfg: Config) -> None:
    p, m, t = cfg.parallel, cfg.model, cfg.training
    if p.pp == 1:
        defaults = ParallelConfig()
        for key in ("pp_chunks", "pp_schedule", "pp_split", "pp_slices"):
            if getattr(p, key) != getattr(defaults, key):
                raise ConfigError(
                    f"parallel.{key}={getattr(p, key)!r} has no effect with parallel.pp=1; set "
                    f"parallel.pp > 1 or leave {key} at {getattr(defaults, key)!r}"
                )
        return
    if is_custom(p.pp_schedule):
        check_custom_schedule(cfg)
    elif p.pp_schedule in V_SHAPED and p.pp_chunks != 2:
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule} runs two chunks per rank (a V), but parallel.pp_chunks="
            f"{p.pp_chunks}; set parallel.pp_chunks=2"
        )
    elif p.pp_chunks > 1 and p.pp_schedule != "interleaved-1f1b" and p.pp_schedule not in V_SHAPED:
        raise ConfigError(
            f"parallel.pp_chunks={p.pp_chunks} needs parallel.pp_schedule=interleaved-1f1b "
            f"(got {p.pp_schedule!r}); set pp_chunks=1 or switch the schedule"
        )
    if p.pp_schedule == "interleaved-1f1b" and t.grad_accum % p.pp:
        raise ConfigError(
            f"interleaved-1f1b needs the microbatches (training.grad_accum={t.grad_accum}) to be a "
            f"multiple of parallel.pp={p.pp}; set grad_accum to {p.pp * max(1, t.grad_accum // p.pp)} "
            f"or {p.pp * (t.grad_accum // p.pp + 1)} and adjust global_batch"
        )
    if m.tie_embeddings:
        raise ConfigError(
            "model.tie_embeddings=true is not supported with parallel.pp > 1 (the embedding and "
            "lm_head live on different stages); set tie_embeddings=false"
        )
    if p.pp_split not in ("params", "uniform"):
        try:
            sizes = [int(x) for x in p.pp_split.split(",")]
        except ValueError:
            sizes = []
        if len(sizes) != p.pp * p.pp_chunks or sum(sizes) != m.n_layers or min(sizes, default=0) < 1:
            raise ConfigError(
                f"parallel.pp_split={p.pp_split!r} must be params, uniform, or {p.pp * p.pp_chunks} "
                f"positive block counts summing to model.n_layers={m.n_layers}"
            )


def check_slices(cfg: Config) -> None:
    """Token-level pipelining (terapipe): its slices divide the sequence, and it runs under plain pp and dp."""
    p, t, m = cfg.parallel, cfg.training, cfg.model
    if p.pp_schedule not in SLICED:
        if p.pp_slices != 1:
            raise ConfigError(
                f"parallel.pp_slices={p.pp_slices} needs parallel.pp_schedule=terapipe (got {p.pp_schedule!r}); "
                "set pp_slices=1 or pp_schedule=terapipe"
            )
        return
    if t.seq_len % p.pp_slices:
        raise ConfigError(
            f"parallel.pp_slices={p.pp_slices} must divide training.seq_len={t.seq_len} (every slice has "
            "the same length); change pp_slices or seq_len"
        )
    # Each refusal: (field, value, is it set, why the slices cannot run with it, what to set)
    refused = (
        ("parallel.cp", p.cp, p.cp > 1, "context parallelism shards the sequence that the slices cut", "cp=1"),
        (
            "parallel.tp",
            p.tp,
            p.tp > 1,
            "its sharded heads with kept keys and values are a path this build has not verified",
            "tp=1",
        ),
        (
            "parallel.zero_stage",
            p.zero_stage,
            p.zero_stage == 3,
            "ZeRO-3 gathers each block once per slice, a path this build has not verified",
            "zero_stage<=2",
        ),
        (
            "model.n_experts",
            m.n_experts,
            m.n_experts > 0,
            "expert routing and its balancing are per whole sequence",
            "n_experts=0",
        ),
        (
            "training.activation_checkpointing",
            t.activation_checkpointing,
            t.activation_checkpointing != "none",
            "recomputing a block would store its slice's keys and values twice",
            "activation_checkpointing=none",
        ),
    )
    for field, value, on, why, fix in refused:
        if on:
            raise ConfigError(
                f"parallel.pp_schedule={p.pp_schedule} with {field}={value!r} is not supported ({why}); set {fix}"
            )


def check_two_bw(cfg: Config) -> None:
    """PipeDream-2BW runs plain pipelining, with or without plain data parallelism, and nothing else."""
    p, t = cfg.parallel, cfg.training
    if p.pp == 1 or p.pp_schedule != TWO_BW:
        return
    if t.grad_accum < p.pp:
        raise ConfigError(
            f"parallel.pp_schedule=2bw needs training.grad_accum >= parallel.pp (got grad_accum={t.grad_accum}, "
            f"pp={p.pp}): 2BW accumulates a version's gradient over at least pp microbatches; raise global_batch"
        )
    layout = "plain pipelining with optional data parallelism only"
    # the stashed version and the gradient in flight are not in a checkpoint: a resume would not be exact
    inexact = "its stashed weight version and in-flight gradient are not checkpointed, so a resume would not be exact"
    unsupported = {
        "parallel.tp": (p.tp, 1, layout),
        "parallel.cp": (p.cp, 1, layout),
        "parallel.ep": (p.ep, 1, layout),
        "parallel.zero_stage": (p.zero_stage, 0, layout),
        "parallel.diloco": (p.diloco, 1, layout),
        "model.n_experts": (cfg.model.n_experts, 0, layout),
        "optimizer.name": (cfg.optimizer.name, "adamw", layout),
        "checkpoint.resume": (cfg.checkpoint.resume, "never", inexact),
    }
    for name, (value, fix, why) in unsupported.items():
        if value != fix:
            raise ConfigError(
                f"{name}={value!r} is not supported with parallel.pp_schedule=2bw ({why}); "
                f"set {name}={fix!r} or use pp_schedule=1f1b"
            )


def check_custom_schedule(cfg: Config) -> None:
    p, t = cfg.parallel, cfg.training
    where = f"parallel.pp_schedule={p.pp_schedule!r}"
    try:
        schedule, layout = build_schedule(p.pp_schedule, p.pp, t.grad_accum, p.pp_chunks)
        found = 1 + max(a.microbatch for actions in schedule for a in actions)
        if (layout.pp, layout.chunks, found) != (p.pp, p.pp_chunks, t.grad_accum):
            raise ScheduleError(
                f"it has pp={layout.pp}, {layout.chunks} chunks and {found} microbatches but the run has "
                f"parallel.pp={p.pp}, parallel.pp_chunks={p.pp_chunks}, training.grad_accum={t.grad_accum}"
            )
        validate_schedule(schedule, p.pp, p.pp_chunks, t.grad_accum, layout)
    except (OSError, ValueError) as e:  # ScheduleError is a ValueError
        raise ConfigError(f"{where}: {e}") from None
