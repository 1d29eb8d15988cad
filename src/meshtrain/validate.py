"""Cross-field validation of a `Config` against a world size, run before any process is spawned.

Each check raises `ConfigError` with one line: the fields, their values and what to change.
`SUPPORTED` lists what this build can run; later parallelisms widen it rather than add checks.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshtrain.config import SECTIONS, Config, ConfigError, ParallelConfig, launch_degrees
from meshtrain.data.shards import has_val_split, read_meta
from meshtrain.hf.config import hf_dir, read_hf_config
from meshtrain.hf.files import expected_params, header_shapes, missing_or_misshaped
from meshtrain.pipeline.schedules import SCHEDULES, TWO_BW, is_custom, splits_backward
from meshtrain.preflight import tokenizer_vocab
from meshtrain.validate_comm import check_diloco, check_onebit_adam, check_zeropp, resolve_islands
from meshtrain.validate_pipeline import check_pipeline, check_slices, check_two_bw

CHOICES: dict[str, tuple[str, ...]] = {
    "training.dtype": ("fp32", "bf16"),
    "training.lr_schedule": ("cosine", "wsd", "constant"),
    "training.activation_checkpointing": ("none", "full"),
    "training.compile": ("none", "blocks", "model"),
    "training.device": ("auto", "cpu", "cuda"),
    "parallel.pp_schedule": (*SCHEDULES, TWO_BW),
    "parallel.reduce_dtype": ("fp32", "bf16"),
    "parallel.cp_mode": ("ring", "ulysses"),
    "parallel.cp_balance": ("zigzag", "contiguous"),
    "model.router_score": ("softmax", "sigmoid"),
    "model.load_balance": ("aux_loss", "bias", "none"),
    "optimizer.name": ("adamw", "onebit_adam"),
    "data.source": ("stdlib", "files", "tokens", "synthetic"),
    "checkpoint.resume": ("auto", "never"),
    "comm.emulate_scope": ("inter-node", "all"),
    "diloco.pseudo_grad_dtype": ("fp32", "bf16", "int8"),
}

# Degrees this build can run, and the feature that brings the rest. Widened as features land.
SUPPORTED_MAX: dict[str, int] = {}
PENDING: dict[str, str] = {}

POSITIVE = (
    "model.dim",
    "model.n_layers",
    "model.n_heads",
    "model.n_kv_heads",
    "model.vocab_size",
    "model.max_seq_len",
    "training.steps",
    "training.global_batch",
    "training.micro_batch",
    "training.seq_len",
    "training.ac_every",
    "training.eval_batches",
    "parallel.dp_replicate",
    "parallel.tp",
    "parallel.pp",
    "parallel.pp_chunks",
    "parallel.pp_slices",
    "parallel.cp",
    "parallel.ep",
    "parallel.diloco",
    "diloco.inner_steps",
    "diloco.fragments",
    "checkpoint.keep",
    "logging.log_interval",
)


def _in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[float], bool]:
    return lambda v: (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


INF = math.inf
# (key, allowed, what to do): each checked after every float field is known to be finite
VALUES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("training.lr", _in(0, INF), "must not be negative"),
    ("training.grad_clip", _in(0, INF), "must not be negative (0 disables clipping)"),
    ("training.min_lr_ratio", _in(0, 1), "must be in [0, 1]: the final learning rate as a fraction of training.lr"),
    ("training.decay_fraction", _in(0, 1, lo_open=True), "must be in (0, 1]: the share of steps spent decaying"),
    ("training.seed", _in(0, INF), "must not be negative (it seeds the data order)"),
    ("optimizer.beta1", _in(0, 1, hi_open=True), "must be in [0, 1) (at 1 Adam's bias correction divides by 0)"),
    ("optimizer.beta2", _in(0, 1, hi_open=True), "must be in [0, 1) (at 1 the second moment never updates)"),
    ("optimizer.eps", _in(0, INF, lo_open=True), "must be > 0"),
    ("optimizer.weight_decay", _in(0, 1), "must be in [0, 1]"),
    ("model.rope_theta", _in(0, INF, lo_open=True), "must be > 0 (the rotary frequencies' base)"),
    ("model.norm_eps", _in(0, INF, lo_open=True), "must be > 0"),
    ("model.init_std", _in(0, INF, lo_open=True), "must be > 0"),
    ("model.n_experts", _in(0, INF), "must not be negative (0 = a dense model)"),
    ("model.expert_ffn_dim", _in(0, INF), "must not be negative (0 = the dense MLP's hidden size)"),
    ("model.n_shared_experts", _in(0, INF), "must not be negative"),
    ("model.first_dense_layers", _in(0, INF), "must not be negative"),
    ("model.capacity_factor", _in(0, INF), "must not be negative (0 = dropless)"),
    ("model.aux_loss_coef", _in(0, INF), "must not be negative"),
    ("model.z_loss_coef", _in(0, INF), "must not be negative"),
    ("model.bias_update_rate", _in(0, INF), "must not be negative"),
    ("data.max_tokens", _in(1, INF), "must be at least 1"),
    ("comm.emulate_gbps", _in(0, INF), "must not be negative (0 = no emulated link)"),
    ("comm.emulate_latency_ms", _in(0, INF), "must not be negative"),
    ("parallel.node_size", _in(0, INF), "must not be negative (0 = the local world size)"),
    ("parallel.zeropp_block", _in(2, INF), "must be at least 2 elements per scale"),
    ("diloco.int8_block", _in(2, INF), "must be at least 2 elements per scale"),
    ("diloco.outer_lr", _in(0, INF, lo_open=True), "must be > 0 (DiLoCo uses 0.7)"),
    ("diloco.outer_momentum", _in(0, 1, hi_open=True), "must be in [0, 1) (DiLoCo uses 0.9)"),
    ("diloco.timeout_s", _in(0, INF, lo_open=True), "must be > 0"),
    ("data.val_fraction", _in(0, 0.5, hi_open=True), "must be in [0, 0.5) (0 = no validation split)"),
    ("parallel.bucket_mb", _in(0, INF, lo_open=True), "must be > 0"),
    ("logging.peak_tflops", _in(0, INF), "must not be negative (0 detects it)"),
    ("logging.sample_tokens", _in(0, INF), "must not be negative"),
    ("resilience.collective_timeout_s", _in(0, INF), "must not be negative (0 disables the watchdog)"),
    ("resilience.heartbeat_s", _in(0, INF, lo_open=True), "must be > 0"),
    ("resilience.max_skipped_steps", _in(0, INF), "must not be negative"),
    ("resilience.spike_sigma", _in(0, INF), "must not be negative (0 disables the spike rule)"),
    ("resilience.spike_window", _in(2, INF), "must be at least 2"),
    ("resilience.straggler_factor", _in(1, INF, lo_open=True), "must be > 1"),
    ("resilience.straggler_steps", _in(1, INF), "must be at least 1"),
)


def _check_values(cfg: Config) -> None:
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{f.name}={value} is not a finite number; give a number")
    for key, allowed, rule in VALUES:
        if not allowed(_get(cfg, key)):
            raise ConfigError(f"{key}={_get(cfg, key)} {rule}")
    t, r = cfg.training, cfg.resilience
    if t.warmup_steps > t.steps:
        raise ConfigError(
            f"training.warmup_steps={t.warmup_steps} exceeds training.steps={t.steps}; lower warmup_steps"
        )
    if r.collective_timeout_s and r.heartbeat_s >= r.collective_timeout_s:
        raise ConfigError(
            f"resilience.heartbeat_s={r.heartbeat_s} must be below resilience.collective_timeout_s="
            f"{r.collective_timeout_s}"
        )
    _check_data_fields(cfg)
    _check_tokens_data(cfg)
    _check_evaluation(cfg)


def _check_evaluation(cfg: Config) -> None:
    t, d = cfg.training, cfg.data
    if t.eval_interval and not has_val_split(d):
        fix = "prepare it with --val-fraction" if d.source == "tokens" else "set data.val_fraction (e.g. 0.01)"
        raise ConfigError(
            f"training.eval_interval={t.eval_interval} needs a validation split, and data.source={d.source!r} "
            f"holds none out; {fix} or set training.eval_interval=0"
        )
    # torch.utils.tensorboard needs the package; look for it without importing it
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "logging.tensorboard=true needs the tensorboard package; pip install tensorboard or set "
            "logging.tensorboard=false"
        )


def _check_data_fields(cfg: Config) -> None:
    d = cfg.data
    if d.path and d.source not in ("files", "tokens"):
        raise ConfigError(
            f"data.path={d.path!r} is ignored by data.source={d.source!r}; set data.source=files or remove data.path"
        )
    bad = [e for e in d.extensions.split(",") if e.strip() and not e.strip().startswith(".")]
    if bad:
        raise ConfigError(f"data.extensions={d.extensions!r}: {bad[0]!r} needs a leading dot, e.g. .{bad[0].strip()}")


def _check_tokens_data(cfg: Config) -> None:
    """data.source = tokens: data.path holds finished prepare-data output that fits the config."""
    d = cfg.data
    if d.source != "tokens":
        return
    if not d.path:
        raise ConfigError("data.source=tokens needs data.path, a folder written by `meshtrain prepare-data`")
    meta = read_meta(Path(d.path))
    vocab, prepared = tokenizer_vocab(d.tokenizer), meta["vocab_size"]
    if vocab != prepared:
        raise ConfigError(
            f"data.tokenizer={d.tokenizer!r} has {vocab} tokens but data.path={d.path!r} was prepared with "
            f"{meta['tokenizer']!r} ({prepared} tokens); set data.tokenizer to the tokenizer it was prepared with"
        )
    if cfg.model.vocab_size < prepared:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is below the {prepared} token ids in data.path={d.path!r}; "
            f"set model.vocab_size >= {prepared}"
        )
    if d.val_fraction > 0:
        raise ConfigError(
            f"data.val_fraction={d.val_fraction} does not apply to data.source=tokens: its validation split is the one "
            "prepare-data --val-fraction held out; set data.val_fraction=0"
        )
    sequences = (meta["splits"]["train"]["tokens"] - 1) // cfg.training.seq_len
    if sequences < cfg.training.global_batch:
        raise ConfigError(
            f"data.path={d.path!r} holds {sequences} training sequences of training.seq_len={cfg.training.seq_len}, "
            f"fewer than one training.global_batch={cfg.training.global_batch}; prepare more data or lower them"
        )


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _check_fields(cfg: Config) -> None:
    for key, options in CHOICES.items():
        if key == "parallel.pp_schedule" and is_custom(cfg.parallel.pp_schedule):
            continue  # a user's schedule file, checked against the layout in check_custom_schedule
        if _get(cfg, key) not in options:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {', '.join(options)}")
    for key in POSITIVE:
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)} must be at least 1")
    for key in ("training.warmup_steps", "training.eval_interval", "checkpoint.interval", "model.ffn_dim"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must not be negative")
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard={cfg.parallel.dp_shard} must be -1 (use the ranks left) or at least 1")
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={cfg.parallel.zero_stage} must be 0, 1, 2 or 3")


def _check_model(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    if m.dim % m.n_heads:
        raise ConfigError(
            f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}; pick a head count that divides dim"
        )
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; grouped-query attention needs whole groups"
        )
    if m.head_dim % 2:
        raise ConfigError(f"head dim = model.dim/model.n_heads = {m.head_dim} must be even for rotary embeddings")
    if m.n_heads % p.tp or m.n_kv_heads % p.tp:
        raise ConfigError(
            f"parallel.tp={p.tp} must divide model.n_heads={m.n_heads} and model.n_kv_heads={m.n_kv_heads}; choose tp from the common divisors"
        )
    if m.hidden_dim % p.tp:
        raise ConfigError(
            f"parallel.tp={p.tp} must divide the MLP hidden size {m.hidden_dim} (model.ffn_dim={m.ffn_dim}; 0 derives it from dim); "
            f"set model.ffn_dim to a multiple of {p.tp} or choose another tp"
        )
    if m.vocab_size % p.tp:
        raise ConfigError(
            f"parallel.tp={p.tp} must divide model.vocab_size={m.vocab_size}; pad the vocabulary to "
            f"{-(-m.vocab_size // p.tp) * p.tp} or choose another tp"
        )
    if p.sequence_parallel and cfg.training.seq_len % p.tp:
        raise ConfigError(
            f"training.seq_len={cfg.training.seq_len} must be divisible by parallel.tp={p.tp} with "
            f"parallel.sequence_parallel=true; change seq_len or tp"
        )
    if cfg.training.seq_len > m.max_seq_len:
        raise ConfigError(
            f"training.seq_len={cfg.training.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower seq_len or raise max_seq_len"
        )
    if p.pp * p.pp_chunks > m.n_layers:
        raise ConfigError(
            f"parallel.pp*pp_chunks = {p.pp}*{p.pp_chunks} = {p.pp * p.pp_chunks} stages is more than "
            f"model.n_layers={m.n_layers}; every stage needs a block: lower pp or pp_chunks"
        )


def _check_context(cfg: Config) -> None:
    p, m, t = cfg.parallel, cfg.model, cfg.training
    if p.cp == 1:
        defaults = ParallelConfig()
        for key in ("cp_mode", "cp_balance"):
            if getattr(p, key) != getattr(defaults, key):
                raise ConfigError(
                    f"parallel.{key}={getattr(p, key)!r} has no effect with parallel.cp=1; set "
                    f"parallel.cp > 1 or leave {key} at {getattr(defaults, key)!r}"
                )
        return
    zigzag = p.cp_mode == "ring" and p.cp_balance == "zigzag"
    chunks = 2 * p.cp if zigzag else p.cp
    how = "2*cp (zigzag: each rank holds 2 chunks)" if zigzag else "cp"
    if t.seq_len % chunks:
        raise ConfigError(
            f"training.seq_len={t.seq_len} must be divisible by {how} = {chunks}; change seq_len or cp"
            + ("" if not zigzag else ", or set parallel.cp_balance=contiguous")
        )
    if p.sequence_parallel and (t.seq_len // p.cp) % p.tp:
        raise ConfigError(
            f"training.seq_len/cp = {t.seq_len // p.cp} must be divisible by parallel.tp={p.tp} under "
            "sequence parallelism; change seq_len"
        )
    if p.cp_mode == "ulysses" and (m.n_heads % (p.tp * p.cp) or m.n_kv_heads % (p.tp * p.cp)):
        raise ConfigError(
            f"parallel.cp_mode=ulysses splits heads over tp*cp = {p.tp * p.cp}: model.n_heads="
            f"{m.n_heads} and model.n_kv_heads={m.n_kv_heads} must be divisible by it; use cp_mode=ring"
        )


def _check_experts(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    if m.n_experts == 0:
        if p.ep > 1:
            raise ConfigError(f"parallel.ep={p.ep} splits experts, but model.n_experts=0; set model.n_experts or ep=1")
        return
    if p.ep > 1:
        _check_expert_parallel(cfg)
    if not 1 <= m.top_k <= m.n_experts:
        raise ConfigError(f"model.top_k={m.top_k} must be in 1 .. model.n_experts={m.n_experts}")
    if m.first_dense_layers >= m.n_layers:
        raise ConfigError(
            f"model.first_dense_layers={m.first_dense_layers} leaves no MoE block of model.n_layers={m.n_layers}; "
            "lower it or set model.n_experts=0"
        )
    if p.pp > 1 and splits_backward(p.pp_schedule):
        raise ConfigError(
            f"model.n_experts={m.n_experts} with parallel.pp_schedule={p.pp_schedule} is not supported: the "
            "experts' grouped matmuls compute their weight gradients in backward, not in a separate W step; "
            "use gpipe, 1f1b or interleaved-1f1b"
        )
    if p.tp > 1:
        raise ConfigError(
            f"model.n_experts={m.n_experts} with parallel.tp={p.tp} is not supported: tensor parallelism would "
            "have to split every expert over tp (Megatron's expert tensor parallelism) or replicate the experts "
            "and split their tokens by sequence parallelism, and this build does neither; MoE runs under dp, "
            "ZeRO, ep, cp and pp: set parallel.tp=1"
        )
    if p.cp > 1 and m.capacity_factor > 0:
        raise ConfigError(
            f"model.capacity_factor={m.capacity_factor} with parallel.cp={p.cp} is not supported: capacity keeps "
            "each expert's first assignments of a whole sequence, and context parallelism splits the sequence "
            "over ranks; set model.capacity_factor=0 (dropless) or parallel.cp=1"
        )


def _check_expert_parallel(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    if m.n_experts % p.ep:
        raise ConfigError(
            f"model.n_experts={m.n_experts} must be divisible by parallel.ep={p.ep} (each rank holds n_experts/ep)"
        )


def _check_zero(cfg: Config) -> None:
    p = cfg.parallel
    if p.offload and p.zero_stage == 0:
        raise ConfigError(
            "parallel.offload=true needs parallel.zero_stage >= 1 (it offloads the sharded optimizer state); "
            "set zero_stage or offload=false"
        )


def _check_compile(cfg: Config) -> None:
    """What training.compile cannot do, by name (docs/performance.md, "Compile")."""
    mode, p = cfg.training.compile, cfg.parallel
    if mode == "none":
        return
    if p.cp > 1:  # the ring / Ulysses attention core runs its collectives inside the block's body
        raise ConfigError(
            f"training.compile={mode} is not supported with parallel.cp={p.cp}: context-parallel attention's "
            f"collectives run inside the compiled block; set training.compile=none"
        )
    if p.ep > 1:  # the MoE layer's all-to-all dispatch runs inside the block's body
        raise ConfigError(
            f"training.compile={mode} is not supported with parallel.ep={p.ep}: the experts' all-to-all runs "
            f"inside the compiled block; set training.compile=none"
        )
    if mode == "model" and p.zero_stage == 3:  # its gather/free hooks would sit inside the compiled region
        raise ConfigError(
            "training.compile=model is not supported with parallel.zero_stage=3, whose module hooks would run "
            "inside the compiled model; use training.compile=blocks"
        )


def resolve_dp_shard(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    other = p.dp_replicate * p.cp * p.tp * p.pp
    if p.dp_shard != -1:
        return p.dp_shard
    island = resolve_islands(cfg, world_size)
    if island % other:
        raise ConfigError(
            f"world size {world_size} is not divisible by dp_replicate*cp*tp*pp = {p.dp_replicate}*{p.cp}*{p.tp}*{p.pp} = {other}"
            + (f" per island (parallel.diloco={p.diloco} islands of {island})" if island != world_size else "")
            + "; change --nproc or the parallel degrees"
        )
    return island // other


def _check_layout(cfg: Config, world_size: int) -> None:
    p, t = cfg.parallel, cfg.training
    product = launch_degrees(cfg).world_size
    if product != world_size:
        islands = f"{p.diloco}*" if product != p.degrees.island_size else ""
        raise ConfigError(
            f"parallel.{'diloco*' if islands else ''}dp_replicate*dp_shard*cp*tp*pp = {islands}{p.dp_replicate}*{p.dp_shard}*"
            f"{p.cp}*{p.tp}*{p.pp} = {product} but the world size is {world_size}; set --nproc {product} or parallel.dp_shard=-1"
        )
    if (p.dp_shard * p.cp) % p.ep:
        raise ConfigError(
            f"parallel.ep={p.ep} must divide dp_shard*cp = {p.dp_shard * p.cp}; experts borrow those ranks"
        )
    for name, limit in SUPPORTED_MAX.items():
        if getattr(p, name) > limit:
            raise ConfigError(
                f"parallel.{name}={getattr(p, name)} is not supported by this build yet ({PENDING[name]}); set parallel.{name}=1"
            )
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError(
            "parallel.sequence_parallel=true needs parallel.tp > 1; set sequence_parallel=false or raise tp"
        )
    if p.async_tp and not (p.tp > 1 and p.sequence_parallel):
        raise ConfigError(
            f"parallel.async_tp=true needs parallel.tp > 1 and parallel.sequence_parallel=true (got tp={p.tp}, "
            f"sequence_parallel={str(p.sequence_parallel).lower()}): it decomposes SP's collectives; set "
            f"sequence_parallel=true with tp > 1, or async_tp=false"
        )
    dp = p.degrees.dp * p.diloco  # the global batch counts the sequences of every island
    if t.grad_accum == -1:
        if t.global_batch % (t.micro_batch * dp):
            raise ConfigError(
                f"training.global_batch={t.global_batch} is not divisible by micro_batch*dp = {t.micro_batch}*{dp}; "
                f"set training.global_batch to a multiple of {t.micro_batch * dp} or change training.micro_batch"
            )
        t.grad_accum = t.global_batch // (t.micro_batch * dp)
    if t.grad_accum < 1:
        raise ConfigError(f"training.grad_accum={t.grad_accum} must be -1 (derive it) or at least 1")
    expected = t.micro_batch * t.grad_accum * dp
    if t.global_batch != expected:
        raise ConfigError(_batch_message(t.global_batch, t.micro_batch, t.grad_accum, dp))


def _batch_message(gb: int, mb: int, ga: int, dp: int) -> str:
    fixes = [f"training.global_batch={mb * ga * dp}"]
    if gb % (mb * dp) == 0:
        fixes.append(f"training.grad_accum={gb // (mb * dp)}")
    if gb % (ga * dp) == 0:
        fixes.append(f"training.micro_batch={gb // (ga * dp)}")
    return (
        f"training.global_batch={gb} != micro_batch*grad_accum*dp = {mb}*{ga}*{dp} = {mb * ga * dp}; "
        f"set {' or '.join(fixes)}"
    )


def _from_hf(cfg: Config) -> None:
    """model.init_from = "hf:DIR": DIR's config.json sets the model, its tokenizer.json the tokenizer
    (unless data.tokenizer names one), and its files must hold every weight in the right shape."""
    directory = hf_dir(cfg.model.init_from)
    cfg.model = dataclasses.replace(cfg.model, **read_hf_config(directory))
    tokenizer = directory / "tokenizer.json"
    if cfg.data.tokenizer == "byte" and tokenizer.is_file():
        cfg.data.tokenizer = str(tokenizer)
    found = header_shapes(directory)
    if not found:
        raise ConfigError(f"model.init_from: {directory} holds no *.safetensors; save the model with safetensors")
    wrong = missing_or_misshaped(expected_params(cfg.model), found)
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise ConfigError(
            f"model.init_from: {directory}'s weights do not fit its config.json: {', '.join(wrong[:3])}{more}"
        )


def validate(cfg: Config, world_size: int, local_world: int = 0) -> Config:
    """Return a copy with dp_shard resolved; raise ConfigError on the first problem found.
    `local_world`: ranks per node when launched on several (0: world_size, one node)."""
    cfg = copy.deepcopy(cfg)
    if world_size < 1:
        raise ConfigError(f"--nproc {world_size} must be at least 1")
    _check_fields(cfg)
    if cfg.model.init_from:
        _from_hf(cfg)
    _check_values(cfg)
    _check_model(cfg)
    cfg.parallel.dp_shard = resolve_dp_shard(cfg, world_size)
    _check_layout(cfg, world_size)
    _check_context(cfg)
    _check_experts(cfg)
    check_pipeline(cfg)
    check_slices(cfg)
    check_two_bw(cfg)
    _check_zero(cfg)
    _check_compile(cfg)
    check_zeropp(cfg, local_world or world_size)
    check_onebit_adam(cfg)
    check_diloco(cfg, world_size)
    return cfg
