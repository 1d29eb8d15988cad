"""Collective costs from the alpha-beta model on ring algorithms.

A ring over n ranks moves, per rank: all-reduce 2(n-1)/n x payload, reduce-scatter and
all-gather (n-1)/n x payload (payload = the full, unsharded tensor), in 2(n-1) or (n-1) steps
of latency alpha each. Point-to-point moves the payload once. The bandwidth is the node's
NVLink when the group fits in a node and the per-device network bandwidth otherwise; the
slowest link sets a ring's pace.

A calibrated cluster (`meshtrain bench-comm --calibrate`) carries measured fits, alpha + bytes / beta
per op and group size; an in-node collective of a fitted op uses the fit of its group size, or the
nearest measured size rescaled by the ring model (alpha by latency steps, beta by bus factor).
"""

from __future__ import annotations

import math

from meshtrain.accounting import wire_factor
from meshtrain.planner.layout import Group
from meshtrain.planner.presets import COMM_OPS, ClusterSpec, CommFit

RING_KINDS = COMM_OPS  # the kinds a calibrated fit may name are the ring model's


def ring_terms(kind: str, n: int) -> tuple[float, int]:
    """(bytes sent per payload byte, latency steps) of a collective over n ranks."""
    if kind not in RING_KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; expected one of {', '.join(RING_KINDS)}")
    # bytes from the runtime's own convention (accounting.py), so predictions and metrics agree by construction
    steps = {"all_reduce": 2 * (n - 1), "p2p": 1}.get(kind, n - 1)
    return wire_factor(kind, n), steps


def wire_bytes(kind: str, payload: float, n: int) -> float:
    """Bytes one rank sends for a collective of `payload` bytes over n ranks."""
    return ring_terms(kind, n)[0] * payload if n > 1 else 0.0


def _link(cluster: ClusterSpec, group: Group) -> tuple[float, float]:
    if group.inter_node:
        return cluster.inter_bw_gbs * 1e9, cluster.inter_latency_us * 1e-6
    return cluster.intra_bw_gbs * 1e9, cluster.intra_latency_us * 1e-6


def collective_time(kind: str, payload: float, group: Group, cluster: ClusterSpec, bucket: float = 0.0) -> float:
    """Seconds for one collective (or a bucketed series of them) of `payload` bytes.
    Each bucket pays the ring's latency again, which is what makes tiny buckets slow."""
    if group.size <= 1 or payload <= 0:
        return 0.0
    calls = math.ceil(payload / bucket) if bucket > 0 else 1
    factor, steps = ring_terms(kind, group.size)
    fit = None if group.inter_node else cluster.fit_for(kind, group.size)
    if fit is not None:
        return calls * _fitted_alpha(fit, kind, group.size) + payload / _fitted_beta(fit, kind, group.size)
    bw, alpha = _link(cluster, group)
    return calls * steps * alpha + factor * payload / bw


def _fitted_alpha(fit: CommFit, kind: str, n: int) -> float:
    """Seconds of fixed cost per call at n ranks: the fit's, scaled by latency steps when n differs."""
    return fit.alpha_us * 1e-6 * ring_terms(kind, n)[1] / ring_terms(kind, fit.ranks)[1]


def _fitted_beta(fit: CommFit, kind: str, n: int) -> float:
    """Payload bytes per second at n ranks: the fit's bus bandwidth (beta x bus factor) over n's factor."""
    return fit.beta_gbs * 1e9 * ring_terms(kind, fit.ranks)[0] / ring_terms(kind, n)[0]
