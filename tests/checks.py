"""Checks the equivalence tests share: against the single-device run, against the planner (every
rank), and against the independent communication count of tests/comm_counter.py."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from comm_counter import load_counts
from dist_utils import Run, read_metrics
from meshtrain.config import load_config
from meshtrain.planner import predict_run

TRAFFIC = (
    "comm_all_reduce_bytes",
    "comm_reduce_scatter_bytes",
    "comm_all_gather_bytes",
    "comm_all_to_all_bytes",
    "comm_p2p_bytes",
    "comm_wire_bytes",
)
KIND_OF = {
    "comm_all_reduce_bytes": "all_reduce",
    "comm_reduce_scatter_bytes": "reduce_scatter",
    "comm_all_gather_bytes": "all_gather",
    "comm_all_to_all_bytes": "all_to_all",
    "comm_p2p_bytes": "p2p",
}


def rel_diff(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def assert_same_training(got: list[dict], ref: list[dict], loss: float, grad_norm: float) -> None:
    """Losses and gradient norms step by step, relative to the single-device run."""
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    d_loss = rel_diff([r["loss"] for r in got], [r["loss"] for r in ref])
    d_norm = rel_diff([r["grad_norm"] for r in got], [r["grad_norm"] for r in ref])
    assert d_loss < loss and d_norm < grad_norm, (d_loss, d_norm)


def ranks(run: Run) -> range:
    return range(run.nproc)


def zero_padding_slack(run: Run) -> float:
    """Model-state bytes ZeRO's padding may add or leave out on a rank: 16 bytes (fp32 param, grad,
    Adam moments) for up to 8 padded elements in each of 4 units; 0 without ZeRO."""
    return (
        16 * 8 * 4 if any(o.startswith("parallel.zero_stage=") and not o.endswith("=0") for o in run.overrides) else 0
    )


def assert_planner_agrees(run: Run, keys: Sequence[str] = TRAFFIC, state_slack: float = 0.0) -> None:
    """On every rank and step: predicted communication bytes equal the measured ones, and model
    states equal them within `state_slack` bytes (ZeRO's padding, either way; 0 elsewhere)."""
    cfg = load_config(run.config, run.overrides)
    for rank in ranks(run):
        predicted = predict_run(cfg, run.nproc, rank)
        for rec in read_metrics(run.run_dir, rank):
            gap = rec["mem_model_state_bytes"] - predicted["mem_model_state_bytes"]
            assert abs(gap) <= state_slack, (rank, rec["step"], gap)
            for key in keys:
                assert predicted[key] == pytest.approx(rec.get(key, 0), abs=1), (rank, rec["step"], key)


def counted(run: Run, rank: int) -> dict[str, int]:
    """Bytes per kind that reached torch.distributed on `rank` over the whole run (scalars apart)."""
    return load_counts(run.run_dir, rank)["bytes"]


def recorded(run: Run, rank: int, key: str) -> float:
    """What meshtrain's own counters reported for `key` on `rank`, summed over the run's steps."""
    return sum(r.get(key, 0) for r in read_metrics(run.run_dir, rank))


def assert_counters_honest(run: Run, keys: Sequence[str]) -> None:
    """Unpadded traffic: what meshtrain reports equals what torch.distributed was handed, every rank."""
    for rank in ranks(run):
        seen = counted(run, rank)
        for key in keys:
            assert recorded(run, rank, key) == seen.get(KIND_OF[key], 0), (rank, key, seen)
