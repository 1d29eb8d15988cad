"""Model and cluster presets, and the TOML files that describe custom ones.

Cluster TOML (`--cluster my.toml`), one `[cluster]` table; every key is optional when `base`
names a preset to start from:
    [cluster]
    base = "h100-80gb"          # preset to inherit from
    name = "my-h100"
    peak_tflops = 989.0         # dense bf16 (or fp32 for precision = "fp32") TFLOP/s per device
    efficiency = 0.7            # achievable fraction of peak for the model's matmuls
    memory_gib = 80.0           # device memory
    usable_memory_fraction = 0.9  # leaves room for the CUDA context and allocator fragmentation
    gpus_per_node = 8
    intra_bw_gbs = 450.0        # per-device, one-direction NVLink bandwidth, GB/s
    inter_bw_gbs = 50.0         # per-device network bandwidth between nodes, GB/s
    intra_latency_us = 3.0      # alpha of the alpha-beta model, per ring step
    inter_latency_us = 8.0
    hbm_bw_gbs = 3350.0         # device memory bandwidth (optimizer step)
    pcie_bw_gbs = 25.0          # host <-> device, for CPU offload
    host_bw_gbs = 100.0         # host memory bandwidth, for the offloaded Adam step
    precision = "bf16"          # bf16: mixed precision (16-bit params/grads, fp32 master + Adam); fp32: all fp32
    # measured fits, time = alpha + bytes / beta, one per op and group size (`bench-comm --calibrate`);
    # an in-node collective of a fitted op uses its fit instead of the bandwidth and latency above
    collectives = [{ op = "all_reduce", ranks = 2, alpha_us = 60.0, beta_gbs = 1.5 }]
    cores = 2                   # CPU cores the ranks share (planner/contention.py); 0 = one device per rank
    calibrated_ranks = 4        # ranks busy at once while peak_tflops was measured

Model TOML (`--model my.toml`): a `[model]` table with either meshtrain's own ModelConfig keys
(dim, n_layers, n_heads, n_kv_heads, vocab_size, ffn_dim, tie_embeddings, ...; any run config
such as configs/tiny.toml works) or the planner's ModelShape keys (kind, n_layers, hidden,
n_heads, n_kv_heads, ffn, vocab, seq_len, tie_embeddings, n_experts, top_k, expert_ffn, dropout).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from meshtrain.config import ModelConfig, load_config
from meshtrain.model.math import ModelShape, from_model_config
from meshtrain.planner.errors import PlanError

COMM_OPS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "p2p")


@dataclass(frozen=True)
class CommFit:
    """A measured collective: one call of `bytes` (bench-comm's size convention) takes alpha + bytes / beta."""

    op: str
    """One of COMM_OPS (the planner's kinds; bench-comm's send_recv is p2p)."""
    ranks: int
    """Group size it was measured at."""
    alpha_us: float
    """Fixed cost of one call, microseconds."""
    beta_gbs: float
    """Bytes per second of the size-dependent part, GB/s (algorithm bandwidth, not bus)."""
    r2: float = 1.0
    """Fit quality, recorded for the reader; the planner does not use it."""
    max_rel_residual: float = 0.0
    """Largest |fit - median| / median over the sizes fitted; recorded only."""


@dataclass(frozen=True)
class ClusterSpec:
    """One kind of device and how the devices are wired; the units are those of the TOML keys."""

    name: str
    peak_tflops: float
    memory_gib: float
    gpus_per_node: int
    intra_bw_gbs: float
    inter_bw_gbs: float
    efficiency: float = 0.7
    usable_memory_fraction: float = 0.9
    intra_latency_us: float = 3.0
    inter_latency_us: float = 8.0
    hbm_bw_gbs: float = 2000.0
    pcie_bw_gbs: float = 25.0
    host_bw_gbs: float = 100.0
    precision: str = "bf16"
    collectives: tuple[CommFit, ...] = ()
    """Measured per-op, per-group-size fits; empty for the presets (the ring model above applies)."""
    cores: int = 0
    """CPU cores the ranks share (bench-comm --calibrate on a CPU); 0: a device per rank, nothing shared."""
    calibrated_ranks: int = 0
    """Ranks that ran at once while peak_tflops was measured; planner/contention.py rescales for other counts."""

    def fit_for(self, op: str, ranks: int) -> CommFit | None:
        """The fit of `op` at `ranks`, else the one of `op` at the nearest measured size, else None."""
        mine = [f for f in self.collectives if f.op == op]
        return min(mine, key=lambda f: (abs(f.ranks - ranks), -f.ranks), default=None)

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def usable_bytes(self) -> float:
        return self.memory_gib * 2**30 * self.usable_memory_fraction

    def check(self) -> ClusterSpec:
        for key in (
            "peak_tflops",
            "memory_gib",
            "gpus_per_node",
            "intra_bw_gbs",
            "inter_bw_gbs",
            "hbm_bw_gbs",
            "pcie_bw_gbs",
            "host_bw_gbs",
        ):
            if getattr(self, key) <= 0:
                raise PlanError(f"cluster {self.name}: {key}={getattr(self, key)} must be positive")
        for key in ("efficiency", "usable_memory_fraction"):
            if not 0 < getattr(self, key) <= 1:
                raise PlanError(f"cluster {self.name}: {key}={getattr(self, key)} must be in (0, 1]")
        if self.precision not in ("bf16", "fp32"):
            raise PlanError(f"cluster {self.name}: precision={self.precision!r} must be bf16 or fp32")
        for f in self.collectives:
            if f.op not in COMM_OPS or f.ranks < 2 or f.alpha_us < 0 or f.beta_gbs <= 0:
                raise PlanError(
                    f"cluster {self.name}: collectives entry op={f.op!r} ranks={f.ranks} alpha_us={f.alpha_us} "
                    f"beta_gbs={f.beta_gbs}: op must be one of {', '.join(COMM_OPS)}, ranks >= 2, "
                    "alpha_us >= 0 and beta_gbs > 0"
                )
        return self


CLUSTERS: dict[str, ClusterSpec] = {
    # NVLink figures are one-direction per GPU (A100 600 GB/s and H100 900 GB/s bidirectional);
    # IB is one 200 Gb/s HDR (A100) or 400 Gb/s NDR (H100) NIC per GPU.
    # `efficiency` bundles matmul efficiency with the memory-bound ops the FLOP count leaves out;
    # 0.6 on A100 lands Megatron's published GPT-3 figures (docs/planner.md), H100s reach less of
    # their larger peak.
    "a100-80gb": ClusterSpec("a100-80gb", 312.0, 80.0, 8, 300.0, 25.0, efficiency=0.6, hbm_bw_gbs=2039.0),
    "h100-80gb": ClusterSpec("h100-80gb", 989.0, 80.0, 8, 450.0, 50.0, efficiency=0.55, hbm_bw_gbs=3350.0),
    # Our laptop runs: fp32, one device = one core, gloo over shared memory, one "node". Calibrated on
    # the 2-core development machine: the DP benchmark reaches ~0.077 TF/s per core (0.15 x 0.5).
    "cpu": ClusterSpec(
        "cpu",
        0.15,
        16.0,
        8,
        5.0,
        1.0,
        efficiency=0.5,
        usable_memory_fraction=0.8,
        intra_latency_us=50.0,
        inter_latency_us=200.0,
        hbm_bw_gbs=20.0,
        pcie_bw_gbs=20.0,
        host_bw_gbs=20.0,
        precision="fp32",
    ),
}

MODELS: dict[str, ModelShape] = {
    "gpt3-175b": ModelShape(
        "gpt3-175b", "gpt", 96, 12288, 96, 96, 4 * 12288, 50257, seq_len=2048, tie_embeddings=True, dropout=True
    ),
    "llama3-8b": ModelShape("llama3-8b", "llama", 32, 4096, 32, 8, 14336, 128256, seq_len=8192),
    "llama3-70b": ModelShape("llama3-70b", "llama", 80, 8192, 64, 8, 28672, 128256, seq_len=8192),
    # Mixtral-8x7B (Jiang et al. 2024): 8 experts of 14336, top-2 in every block; 46.7B total, 12.9B active.
    "mixtral-8x7b": ModelShape(
        "mixtral-8x7b", "llama", 32, 4096, 32, 8, 14336, 32000, seq_len=4096, n_experts=8, top_k=2, expert_ffn=14336
    ),
    # DeepSeek-V3-like (DeepSeek-AI 2024): 256 routed experts of 2048, top-8, one shared expert, the
    # first 3 blocks dense (18432); attention as plain multi-head (MLA is not modelled): ~671B / ~37B.
    "deepseek-v3-like": ModelShape(
        "deepseek-v3-like",
        "llama",
        61,
        7168,
        128,
        128,
        18432,
        129280,
        seq_len=4096,
        n_experts=256,
        top_k=8,
        expert_ffn=2048,
        n_shared_experts=1,
        first_dense_layers=3,
    ),
    # = configs/tiny.toml: dim 64, 2 layers, 4 heads, 2 kv heads, vocab 256, ffn derived (192), untied.
    "tiny": from_model_config(
        ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_dim=0, max_seq_len=128),
        name="tiny",
    ),
}


def did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.4)
    return f"; did you mean '{close[0]}'?" if close else f"; choose from {', '.join(options)}"


def _read_table(path: Path, table: str) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path} is not valid TOML: {e}") from None
    except OSError as e:
        raise PlanError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(raw.get(table), dict):
        raise PlanError(f"{path} has no [{table}] table")
    return dict(raw[table])


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Construct a frozen dataclass from TOML values, naming any unknown or mistyped key."""
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            raise PlanError(f"{where}: unknown key '{key}'" + did_you_mean(key, names))
    try:
        return cls(**values)
    except TypeError as e:
        raise PlanError(f"{where}: {e}") from None


def _coerce(values: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    """TOML ints where floats are declared are fine; anything else of the wrong type is not."""
    hints = {f.name: f.type for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        typ = hints.get(key)
        if typ == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif typ in ("int", "float", "str", "bool") and type(value).__name__ != typ:
            raise PlanError(f"{where}: {key}={value!r} should be a {typ}")
        out[key] = value
    return out


def _from_file(spec: str, presets: dict[str, Any], kind: str) -> tuple[Path, dict[str, Any]]:
    """The path and [kind] table of a TOML spec; a PlanError for a name that is no preset."""
    if not spec.endswith(".toml"):
        raise PlanError(f"unknown {kind} '{spec}'" + did_you_mean(spec, sorted(presets)))
    path = Path(spec)
    return path, _read_table(path, kind)


def load_cluster(spec: str) -> ClusterSpec:
    """A preset name or a TOML file path (see the module docstring for its keys)."""
    if spec in CLUSTERS:
        return CLUSTERS[spec]
    path, values = _from_file(spec, CLUSTERS, "cluster")
    base_name = values.pop("base", None)
    base: dict[str, Any] = {}
    if base_name is not None:
        if base_name not in CLUSTERS:
            raise PlanError(
                f"{path}: unknown base cluster '{base_name}'" + did_you_mean(str(base_name), sorted(CLUSTERS))
            )
        base = dataclasses.asdict(CLUSTERS[base_name])
    base["name"] = path.stem  # a custom cluster is named after its file unless it says otherwise
    merged = {**base, **_coerce(values, ClusterSpec, str(path))}
    merged["collectives"] = _comm_fits(merged.get("collectives", ()), str(path))
    return _build(ClusterSpec, merged, str(path)).check()


def _comm_fits(entries: Any, where: str) -> tuple[CommFit, ...]:
    """`collectives = [{op = ..., ranks = ..., alpha_us = ..., beta_gbs = ...}, ...]` as CommFits."""
    if not isinstance(entries, (list, tuple)) or not all(isinstance(e, dict) for e in entries):
        raise PlanError(f'{where}: collectives should be a list of tables such as {{ op = "all_reduce", ... }}')
    return tuple(_build(CommFit, _coerce(dict(e), CommFit, f"{where} collectives"), where) for e in entries)


def load_model(spec: str) -> ModelShape:
    """A preset name or a TOML file: a run config's [model] table or ModelShape keys."""
    if spec in MODELS:
        return MODELS[spec]
    path, values = _from_file(spec, MODELS, "model")
    config_keys = {f.name for f in fields(ModelConfig)}
    if set(values) <= config_keys:
        cfg = load_config(path)
        return from_model_config(cfg.model, cfg.training.seq_len, name=path.stem).check()
    values.setdefault("name", path.stem)
    return _build(ModelShape, _coerce(values, ModelShape, str(path)), str(path)).check()
