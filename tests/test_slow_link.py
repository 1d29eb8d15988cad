"""The slow-link emulator ([comm] emulate_*): which collectives it covers and by how much it delays
them, against the formula written here (latency + ring wire bytes / bandwidth), and its settings."""

from __future__ import annotations

import pytest

from meshtrain.accounting import SlowLink
from meshtrain.config import ConfigError, load_config
from meshtrain.topology import resolve_node_size
from meshtrain.trainer import slow_link
from meshtrain.validate import validate

pytestmark = pytest.mark.pure


def test_an_emulated_link_delays_what_crosses_nodes_by_latency_plus_bytes_over_bandwidth() -> None:
    link = SlowLink(gbps=1.0, latency_ms=1.0, node_size=2)  # 2 pseudo-nodes of 2 ranks: {0, 1}, {2, 3}
    mb = 1_000_000
    # all-reduce over 2 ranks: 2(n-1)/n = 1 of the tensor on the wire; 8 Mbit at 1 Gbit/s = 8 ms
    assert link.delay_s("all_reduce", mb, (0, 2)) == pytest.approx(0.001 + 0.008)
    assert link.delay_s("all_reduce", mb, (0, 1)) == 0.0  # inside one node
    # all-gather over 4 ranks: (n-1)/n = 3/4 of the gathered tensor
    assert link.delay_s("all_gather", mb, (0, 1, 2, 3)) == pytest.approx(0.001 + 0.75 * 0.008)
    assert link.delay_s("all_reduce", mb, (3,)) == 0.0  # nothing leaves a one-rank group
    everywhere = SlowLink(gbps=1.0, latency_ms=1.0, node_size=2, scope="all")
    assert everywhere.delay_s("all_reduce", mb, (0, 1)) == pytest.approx(0.009)
    assert SlowLink(gbps=0.0, latency_ms=5.0, node_size=1).delay_s("p2p", mb, (0, 1)) == pytest.approx(0.005)


def test_the_link_is_configured_and_checked_before_spawning() -> None:
    assert slow_link(validate(load_config(None, []), 1), 1) is None  # off by default
    cfg = validate(
        load_config(None, ["comm.emulate_gbps=0.1", "comm.emulate_latency_ms=50", "parallel.node_size=2"]), 4
    )
    # the trainer passes the topology's node size, resolve_node_size of parallel.node_size
    assert slow_link(cfg, resolve_node_size(cfg.parallel.node_size)) == SlowLink(0.1, 50.0, 2, "inter-node")
    with pytest.raises(ConfigError, match="comm.emulate_gbps=-1.0 must not be negative"):
        validate(load_config(None, ["comm.emulate_gbps=-1"]), 1)
    with pytest.raises(ConfigError, match="comm.emulate_scope"):
        validate(load_config(None, ["comm.emulate_scope=nodes"]), 1)
