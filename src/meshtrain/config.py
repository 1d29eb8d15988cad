"""Typed run configuration: one dataclass per TOML section, loaded, overridden and validated.

Every field carries a docstring (the string literal right after it); `describe()` reads those so
`--help` and the docs can list them. Validation runs in the launching process, before any worker is
spawned, and raises `ConfigError` whose message is a single line naming the fields and the fix.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import itertools
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from meshtrain.degrees import Degrees


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line and says how to fix it."""


@dataclass
class ModelConfig:
    dim: int = 256
    """Hidden size of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 8
    """Number of query heads; dim must be divisible by it."""
    n_kv_heads: int = 4
    """Number of key/value heads (grouped-query attention); must divide n_heads."""
    vocab_size: int = 256
    """Vocabulary size; 256 for the byte-level tokenizer."""
    ffn_dim: int = 0
    """Hidden size of the SwiGLU MLP; 0 derives it as Llama does (8/3 * dim, rounded up to 64)."""
    max_seq_len: int = 1024
    """Longest sequence the rotary tables are built for; training.seq_len may not exceed it."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output projection (lm_head)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; output projections are scaled by 1/sqrt(2*n_layers)."""
    n_experts: int = 0
    """Routed experts per MoE block; 0 = a dense model (meshtrain.model.moe)."""
    top_k: int = 2
    """Experts each token is routed to (MoE only)."""
    expert_ffn_dim: int = 0
    """Hidden size of each expert's SwiGLU; 0 = the dense MLP's hidden size."""
    n_shared_experts: int = 0
    """Shared experts every token passes through besides its routed ones (DeepSeek's); one MLP that many expert widths wide."""
    first_dense_layers: int = 0
    """Leading blocks that keep a dense MLP, as in DeepSeek-V3 (MoE only)."""
    router_score: str = "softmax"
    """Router scores: softmax or sigmoid (DeepSeek-V3); the chosen experts' scores are renormalised to sum to 1."""
    capacity_factor: float = 0.0
    """Tokens an expert takes per sequence, as a multiple of the even share s*top_k/n_experts; the rest are dropped; 0 = dropless."""
    load_balance: str = "aux_loss"
    """aux_loss (Switch/GShard, sequence-wise), bias (DeepSeek-V3's auxiliary-loss-free bias, updated before each optimizer step) or none."""
    aux_loss_coef: float = 0.01
    """Weight of the auxiliary balancing loss (load_balance = aux_loss)."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss, logsumexp(logits)^2 per token (ST-MoE); 0 = off."""
    bias_update_rate: float = 1e-3
    """Step of the balancing bias per optimizer step: rate * sign(mean load - load), re-centred (load_balance = bias)."""
    init_from: str = ""
    """Start from Hugging Face weights: "hf:DIR", a LlamaForCausalLM or MixtralForCausalLM folder; its config.json sets the fields above, its tokenizer.json the tokenizer. Empty: random init."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim > 0:
            return self.ffn_dim
        return 64 * math.ceil(int(8 * self.dim / 3) / 64)

    @property
    def moe_ffn_dim(self) -> int:
        """Each expert's hidden size."""
        return self.expert_ffn_dim or self.hidden_dim

    def is_moe_layer(self, index: int) -> bool:
        return self.n_experts > 0 and index >= self.first_dense_layers


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    """Data-parallel replicas (the outer DP axis; with ZeRO, shards are replicated across it: HSDP)."""
    dp_shard: int = -1
    """Data-parallel ranks that shard state under ZeRO; -1 takes whatever ranks the other degrees leave."""
    zero_stage: int = 0
    """ZeRO stage over dp_shard: 0 = plain replication, 1 = optimizer states, 2 = + gradients, 3 = + parameters."""
    tp: int = 1
    """Tensor-parallel degree (Megatron style); must divide the heads and kv heads."""
    sequence_parallel: bool = False
    """With tp > 1, split norms and residual activations along the sequence dimension."""
    async_tp: bool = False
    """With sequence_parallel, run its all-gathers and reduce-scatters as collective matmuls: ring steps whose transfers overlap the matmuls that use them."""
    pp: int = 1
    """Pipeline-parallel degree: number of pipeline stages."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-h2, zb-v (needs pp_chunks=2), terapipe (token slices, see pp_slices), 2bw (PipeDream-2BW: no flush, two weight versions, gradients one version late; see docs/pipeline.md), or a path to your own schedule as a .csv file (see `meshtrain schedule --csv-out`)."""
    pp_chunks: int = 1
    """Virtual stages per pipeline rank (v) for interleaved schedules; zb-v needs 2."""
    pp_slices: int = 1
    """Token slices per sequence for pp_schedule=terapipe (TeraPipe): each stage runs slice j after slice j-1 of the same sequence, attending to the keys and values it kept; must divide training.seq_len."""
    pp_split: str = "params"
    """How blocks are cut into pp * pp_chunks stages: params (balanced by parameter count, embedding and head included), uniform, or explicit block counts such as "2,1,1"."""
    cp: int = 1
    """Context-parallel degree: every sequence is split over this many ranks, attention computed across them."""
    cp_mode: str = "ring"
    """How attention spans the cp ranks: ring (keys and values travel a ring) or ulysses (an all-to-all trades the sequence shard for a head shard)."""
    cp_balance: str = "zigzag"
    """The ring's sharding: zigzag (rank r holds chunks r and 2cp-1-r of 2cp, balancing causal work) or contiguous; Ulysses always shards contiguously."""
    ep: int = 1
    """Expert-parallel degree; it borrows ranks from dp_shard * cp rather than adding to the world size."""
    bucket_mb: float = 25.0
    """Gradient bucket size in MiB for the overlapped data-parallel all-reduce."""
    reduce_dtype: str = "fp32"
    """Dtype in which gradients are reduced across data-parallel ranks: fp32 or bf16."""
    offload: bool = False
    """With zero_stage >= 1: keep the fp32 master shards and Adam moments on the host and step there (ZeRO-Offload)."""
    prefetch: bool = True
    """With zero_stage = 3: gather the next unit's parameters while the current one computes, in forward and backward."""
    node_size: int = 0
    """Ranks per node: consecutive global ranks form one (pseudo-)node, for the slow-link emulator's scope ([comm]), the inter-node byte count and ZeRO++'s hierarchy; 0 = the local world size."""
    zeropp_qwz: bool = False
    """With zero_stage = 3: ZeRO++ qwZ, parameters all-gathered as block-wise int8 codes (zeropp_block elements per fp32 scale), decoded on receipt."""
    zeropp_hpz: bool = False
    """With zero_stage = 3: ZeRO++ hpZ, each rank keeps a secondary slice of every unit within its node (1/L of it, L = its shard group's ranks per node), so backward gathers stay inside the node."""
    zeropp_qgz: bool = False
    """With zero_stage = 3: ZeRO++ qgZ, gradients reduced by two int4 all-to-alls (inside the node, then across nodes) summed in fp32, instead of the reduce-scatter."""
    zeropp_block: int = 2048
    """Elements per fp32 scale in ZeRO++'s int8 weight and int4 gradient codes (DeepSpeed uses a few thousand)."""
    diloco: int = 1
    """DiLoCo islands (the outermost axis): the world is this many copies of the layout above, which sync only through the outer step of [diloco]; 1 = off."""

    @property
    def degrees(self) -> Degrees:
        """The layout's degrees (dp_shard must be resolved: meshtrain.validate.validate does it)."""
        if self.dp_shard < 1:
            raise ValueError("resolve parallel.dp_shard (meshtrain.validate.validate) before asking for the degrees")
        return Degrees(self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp, self.ep, self.diloco)


@dataclass
class TrainingConfig:
    steps: int = 100
    """Number of optimizer steps."""
    global_batch: int = 8
    """Sequences per optimizer step, over all data-parallel ranks of every DiLoCo island: micro_batch * grad_accum * dp * parallel.diloco."""
    micro_batch: int = 2
    """Sequences per forward/backward on one rank."""
    grad_accum: int = -1
    """Micro-steps accumulated per optimizer step (also the pipeline's microbatches); -1 derives it as global_batch / (micro_batch * dp * parallel.diloco)."""
    seq_len: int = 128
    """Tokens per training sequence."""
    dtype: str = "fp32"
    """Compute dtype: fp32, or bf16 autocast over fp32 master weights."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr, for the cosine and WSD schedules."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    lr_schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine, wsd (warmup-stable-decay) or constant."""
    decay_fraction: float = 0.2
    """For wsd: the fraction of steps spent in the final linear decay."""
    grad_clip: float = 1.0
    """Clip gradients to this global L2 norm; 0 disables clipping."""
    seed: int = 1234
    """Seed for weights and data order; the same seed gives the same run on any layout."""
    deterministic: bool = False
    """Ask torch for deterministic algorithms (slower; useful for debugging)."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward: none, or full (every ac_every-th block)."""
    ac_every: int = 1
    """With activation_checkpointing = full, checkpoint every k-th block (1 = all blocks)."""
    compile: str = "none"
    """torch.compile: none, blocks (each transformer block, the usual choice) or model (each whole model part); docs/performance.md."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available). The backend follows: gloo on cpu, nccl on cuda."""
    eval_interval: int = 0
    """Compute the validation loss every this many steps and at the last step (val_loss, val_ppl in metrics.jsonl); 0 = never. Needs a validation split (data.val_fraction > 0)."""
    eval_batches: int = 4
    """Global batches of validation sequences per evaluation: always the split's first ones, wrapping around when it holds fewer."""


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    """Optimizer: adamw, or onebit_adam (1-bit Adam: AdamW until freeze_step, then a frozen variance and a sign-compressed momentum all-reduce instead of the gradient all-reduce; docs/compression.md)."""
    freeze_step: int = 0
    """With name = onebit_adam: the optimizer steps of plain AdamW before the variance freezes and compression starts (1 <= freeze_step < training.steps; 15-25% of the run is the usual choice). Must be 0 with adamw."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to norms)."""


@dataclass
class DataConfig:
    source: str = "stdlib"
    """stdlib (the interpreter's own .py sources), files (data.path), tokens (data.path from `meshtrain prepare-data`, memory-mapped) or synthetic (for tests)."""
    path: str = ""
    """File or folder of text for source = files (folders are read recursively); the prepared folder for source = tokens."""
    tokenizer: str = "byte"
    """byte (vocab 256, no download) or a path to a tokenizer.json for the tokenizers library."""
    max_tokens: int = 8_000_000
    """Stop reading the corpus after this many tokens (keeps start-up quick); source = tokens ignores it and reads all."""
    extensions: str = ".py,.txt,.md"
    """Comma-separated file suffixes read from folders."""
    val_fraction: float = 0.0
    """Hold out this fraction of the sequences (the stream's last ones) for validation; 0: train on all, no validation split. Must be 0 for source = tokens, whose split prepare-data made."""


@dataclass
class CheckpointConfig:
    interval: int = 50
    """Save every this many steps (and at the last step); 0 disables checkpoints."""
    resume: str = "auto"
    """auto: continue from the latest checkpoint in the run directory; never: start fresh."""
    keep: int = 2
    """How many of this run's newest complete checkpoints to keep; another run's are never touched."""
    async_save: bool = False
    """Write checkpoints in the background (DCP's async_save): training goes on while the files are written; each is committed (visible to resume) once all its files are on disk."""


@dataclass
class ResilienceConfig:
    collective_timeout_s: float = 600.0
    """Seconds a rank may wait in one collective before the watchdog reports the hang (which ranks lag, where each rank is, every stack) and stops the job; 0 disables the watchdog."""
    heartbeat_s: float = 1.0
    """How often each rank publishes its progress to the rendezvous store for the watchdog."""
    max_skipped_steps: int = 5
    """Consecutive optimizer steps skipped (non-finite loss or gradient norm, or a loss spike) before the run stops with an error."""
    spike_sigma: float = 0.0
    """Skip a step whose loss exceeds mean + spike_sigma x std of the last spike_window steps (OLMo uses 6); 0 disables."""
    spike_window: int = 128
    """Steps of loss history for the spike rule; it applies once half of them exist."""
    straggler_factor: float = 1.5
    """Warn about a rank whose step time stays above this multiple of the median over ranks."""
    straggler_steps: int = 5
    """Consecutive steps a rank must be that slow before the warning."""


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    """Where metrics.jsonl, config.toml and checkpoints go (the CLI's --run-dir sets it)."""
    log_interval: int = 10
    """Print a log line every this many steps (the progress bar updates every step)."""
    progress: bool = True
    """Show a live progress bar on rank 0 when stdout is a terminal."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device for MFU; 0 detects it (GPU table, or a short matmul probe on CPU)."""
    sample_prompt: str = "def "
    """Prompt of the text sample generated at the end of training; empty disables it."""
    sample_tokens: int = 64
    """Tokens generated for that sample."""
    tensorboard: bool = False
    """Also write every step's metrics as TensorBoard events to RUN_DIR/tb (rank 0; `tensorboard --logdir RUN_DIR/tb`)."""


@dataclass
class CommConfig:
    emulate_gbps: float = 0.0
    """Emulate a slow link: each collective in scope is delayed by latency + its wire bytes at this many Gbit/s; 0 = off (meshtrain.accounting.SlowLink)."""
    emulate_latency_ms: float = 0.0
    """The emulated link's latency per collective, in milliseconds."""
    emulate_scope: str = "inter-node"
    """Which collectives the emulated link slows: inter-node (groups spanning parallel.node_size blocks of ranks) or all."""


@dataclass
class DilocoConfig:
    """DiLoCo's outer loop over the islands of parallel.diloco (meshtrain.diloco; docs/diloco.md)."""

    inner_steps: int = 20
    """H: inner optimizer steps each island takes between two outer steps of the same fragment."""
    outer_lr: float = 0.7
    """The outer optimizer's learning rate (Nesterov SGD on the averaged pseudo-gradients; DiLoCo uses 0.7)."""
    outer_momentum: float = 0.9
    """The outer optimizer's Nesterov momentum."""
    pseudo_grad_dtype: str = "fp32"
    """How pseudo-gradients travel between islands: fp32, bf16 or int8 (block absmax codes, summed in fp32)."""
    int8_block: int = 2048
    """With pseudo_grad_dtype = int8: elements per fp32 scale."""
    fragments: int = 1
    """Streaming DiLoCo: the model is cut into this many fragments (layer i in fragment i mod F) that sync at staggered steps, every inner_steps / fragments steps one of them; must divide inner_steps."""
    overlap: bool = False
    """Delay-1 outer step: a fragment's outer all-reduce runs during the next round's inner steps, and its result is applied at that fragment's next sync."""
    join: str = ""
    """HOST:PORT of the outer rendezvous store (`meshtrain lighthouse`): this launch is one island (diloco.island) of an elastic run whose islands may leave and rejoin; empty = all islands in this launch."""
    island: int = 0
    """With diloco.join: this launch's island, 0 .. parallel.diloco - 1."""
    timeout_s: float = 30.0
    """With diloco.join: seconds an outer step waits for an island before it carries on without it."""


def launch_degrees(cfg: Config) -> Degrees:
    """The degrees of this launch's ranks: every island, or one island when each is its own launch (diloco.join)."""
    d = cfg.parallel.degrees
    return dataclasses.replace(d, diloco=1) if cfg.diloco.join else d


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    diloco: DilocoConfig = field(default_factory=DilocoConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: get_type_hints(Config)[f.name] for f in fields(Config)}


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a config dataclass to the docstring written under it."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[stmt.target.id] = str(nxt.value.value)
    return docs


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(options)}"


def _convert(value: Any, typ: type, key: str) -> Any:
    """Convert a TOML value or a --set string to the field's type, with a one-line error."""
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        if typ is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{key}={value!r} is not a boolean; use true or false")
        try:
            return (
                typ(float(text))
                if typ is int and text.replace(".", "", 1).isdigit() and float(text).is_integer()
                else typ(text)
            )
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not a valid {typ.__name__}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r} should be a {typ.__name__}")
    return value


def _set(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"'{dotted}' is not of the form section.key; sections: {', '.join(SECTIONS)}")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section '{section}'" + _suggest(section, list(SECTIONS)))
    cls = SECTIONS[section]
    hints = get_type_hints(cls)
    if key not in hints:
        raise ConfigError(f"unknown config key '{dotted}'" + _suggest(key, list(hints)).replace("'", f"'{section}.", 1))
    setattr(getattr(cfg, section), key, _convert(value, hints[key], dotted))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings (the CLI's --set) in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} needs the form section.key=value")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or start from defaults), then apply overrides. Does not validate."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; pass --config configs/<name>.toml")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file '{p}' is not valid TOML: {e}") from None
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"top-level key '{section}' in {p} must be a [section]" + _suggest(section, list(SECTIONS))
                )
            for key, value in table.items():
                _set(cfg, f"{section}.{key}", value)
    return apply_overrides(cfg, overrides or [])


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """--config, --set (repeatable) and --run-dir: how every entry point takes a run's config."""
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config field, e.g. --set training.steps=30 (repeatable)",
    )
    parser.add_argument("--run-dir", help="output folder for metrics, config and checkpoints (sets logging.run_dir)")


def dump_toml(cfg: Config) -> str:
    """The fully resolved config as TOML (written to RUN_DIR/config.toml)."""
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())
