"""Validation of the features that change what crosses the network (ZeRO++, 1-bit Adam, DiLoCo's
islands): cross-field checks run before any process is spawned, part of meshtrain.validate.

Each check raises `ConfigError` with one line: the fields, their values and what to change.
"""

from __future__ import annotations

from meshtrain.config import Config, ConfigError


def check_zeropp(cfg: Config, local_world: int) -> None:
    p = cfg.parallel
    on = [f"parallel.zeropp_{x}=true" for x in ("qwz", "hpz", "qgz") if getattr(p, f"zeropp_{x}")]
    if not on:
        return
    if p.zero_stage != 3:
        raise ConfigError(f"{', '.join(on)} needs parallel.zero_stage=3 (ZeRO++ extends ZeRO-3), not {p.zero_stage}")
    if p.ep > 1:
        raise ConfigError(
            f"{', '.join(on)} with parallel.ep={p.ep} is not supported: experts shard over their own group, "
            f"which ZeRO++'s node hierarchy does not cut; set ep=1 or turn ZeRO++ off"
        )
    if p.zeropp_qgz and p.zeropp_block % 2:
        raise ConfigError(f"parallel.zeropp_block={p.zeropp_block} must be even: qgZ packs two int4 codes per byte")
    if not (p.zeropp_hpz or p.zeropp_qgz):
        return
    node = p.node_size or local_world
    try:
        places = p.degrees.shard_groups_by_node(node)["shard_intra"]
    except ValueError as e:
        raise ConfigError(
            f"parallel.node_size={node}: {e}; choose a node size that splits dp_shard x cp evenly"
        ) from None
    if p.zeropp_hpz and len(places[0]) < 2:
        raise ConfigError(
            f"parallel.zeropp_hpz=true needs at least 2 ranks of a dp_shard x cp group per node, but "
            f"parallel.node_size={node} leaves {len(places[0])}: hpZ's secondary shard would be the whole unit; "
            f"raise node_size or turn hpz off"
        )


# What 1-bit Adam does not compose with, and why (docs/compression.md has the table).
ONEBIT_REFUSED: tuple[tuple[str, int, str], ...] = (  # (parallel field, the value it must keep, why)
    (
        "zero_stage",
        0,
        "ZeRO shards the optimizer state and reduce-scatters the gradients, while 1-bit Adam compresses "
        "every rank's whole momentum (DeepSpeed's does not compose with ZeRO either)",
    ),
    (
        "tp",
        1,
        "tensor parallelism computes the gradient norm from the gradients itself, and after the freeze those "
        "differ across data-parallel ranks",
    ),
    ("ep", 1, "experts' gradients are summed over other ranks than the dense ones'"),
)


def check_onebit_adam(cfg: Config) -> None:
    o, p, t = cfg.optimizer, cfg.parallel, cfg.training
    if o.name != "onebit_adam":
        if o.freeze_step:
            raise ConfigError(
                f"optimizer.freeze_step={o.freeze_step} has no effect with optimizer.name={o.name!r}; set "
                "optimizer.name=onebit_adam or leave freeze_step at 0"
            )
        return
    if not 1 <= o.freeze_step < t.steps:
        raise ConfigError(
            f"optimizer.freeze_step={o.freeze_step} must be in 1 .. training.steps-1 = {t.steps - 1} with "
            f"optimizer.name=onebit_adam (AdamW's warm-up steps; 15-25% of the run, e.g. {max(1, t.steps // 5)})"
        )
    for key, keep, why in ONEBIT_REFUSED:
        if getattr(p, key) != keep:
            raise ConfigError(
                f"optimizer.name=onebit_adam with parallel.{key}={getattr(p, key)} is not supported: {why}; set "
                f"parallel.{key}={keep} or optimizer.name=adamw"
            )
    if p.degrees.dp * p.cp == 1:
        raise ConfigError(
            "optimizer.name=onebit_adam needs data parallelism (dp x cp > 1): it compresses the momentum's "
            "all-reduce over those ranks, and there is none; raise the dp degree or set optimizer.name=adamw"
        )


def resolve_islands(cfg: Config, world_size: int) -> int:
    """Ranks per island: the world, or its 1/parallel.diloco share when every island is in this launch."""
    p = cfg.parallel
    if cfg.diloco.join or p.diloco == 1:
        return world_size
    if world_size % p.diloco:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.diloco={p.diloco}: every island is a copy of one "
            f"layout; set --nproc to a multiple of {p.diloco} or change parallel.diloco"
        )
    return world_size // p.diloco


def check_diloco(cfg: Config, world_size: int) -> None:
    d, p = cfg.diloco, cfg.parallel
    if p.diloco == 1:
        if d.join:
            raise ConfigError(
                f"diloco.join={d.join!r} needs parallel.diloco > 1 (the number of islands); set parallel.diloco"
            )
        return
    if d.inner_steps % d.fragments:
        raise ConfigError(
            f"diloco.fragments={d.fragments} must divide diloco.inner_steps={d.inner_steps}: one fragment syncs every "
            f"inner_steps / fragments steps; set inner_steps to {d.fragments * max(1, d.inner_steps // d.fragments)}"
        )
    if d.fragments > cfg.model.n_layers:
        raise ConfigError(
            f"diloco.fragments={d.fragments} exceeds model.n_layers={cfg.model.n_layers}: fragments are made of "
            f"layers; set fragments <= {cfg.model.n_layers}"
        )
    if p.ep > 1:
        raise ConfigError(
            f"parallel.diloco={p.diloco} with parallel.ep={p.ep} is not supported: the outer step splits each "
            "fragment among the ranks that hold the same parameters, and experts are held by other ranks than "
            "the dense weights; set ep=1"
        )
    if cfg.optimizer.name != "adamw":
        raise ConfigError(
            f"parallel.diloco={p.diloco} with optimizer.name={cfg.optimizer.name} is not supported: 1-bit Adam's "
            "frozen variance assumes its all-reduce sees every replica each step; set optimizer.name=adamw"
        )
    if d.join:
        host, _, port = d.join.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"diloco.join={d.join!r} must be HOST:PORT of `meshtrain lighthouse`")
        if not 0 <= d.island < p.diloco:
            raise ConfigError(
                f"diloco.island={d.island} must be in 0 .. parallel.diloco-1 = {p.diloco - 1}: which island this launch is"
            )
        if d.overlap:
            raise ConfigError(
                "diloco.join with diloco.overlap=true is not supported: an island that joins or drops out must "
                "not leave a mean in flight; set overlap=false"
            )
