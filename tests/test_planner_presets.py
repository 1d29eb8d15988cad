"""Presets and the TOML files for custom clusters and models."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshtrain.config import ConfigError
from meshtrain.model.math import param_count
from meshtrain.planner.presets import CLUSTERS, MODELS, load_cluster, load_model

pytestmark = pytest.mark.pure


def test_published_shapes() -> None:
    a100, h100 = CLUSTERS["a100-80gb"], CLUSTERS["h100-80gb"]
    assert (a100.peak_tflops, a100.intra_bw_gbs, a100.inter_bw_gbs, a100.gpus_per_node) == (312.0, 300.0, 25.0, 8)
    assert (h100.peak_tflops, h100.intra_bw_gbs, h100.inter_bw_gbs, h100.gpus_per_node) == (989.0, 450.0, 50.0, 8)
    m = MODELS["llama3-70b"]
    assert (m.n_layers, m.hidden, m.n_heads, m.n_kv_heads, m.ffn, m.vocab) == (80, 8192, 64, 8, 28672, 128256)


def test_custom_cluster_inherits_from_base(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[cluster]\nbase = "a100-80gb"\ninter_bw_gbs = 50\nmemory_gib = 40\n')
    c = load_cluster(str(path))
    assert (c.name, c.inter_bw_gbs, c.memory_gib, c.peak_tflops) == ("mine", 50.0, 40.0, 312.0)


def test_custom_cluster_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[cluster]\nbase = "a100-80gb"\npeak_tflop = 1\n')
    with pytest.raises(ConfigError, match="did you mean 'peak_tflops'"):
        load_cluster(str(path))


def test_model_from_run_config_and_from_shape_keys(tmp_path: Path) -> None:
    run_cfg = tmp_path / "tiny.toml"
    run_cfg.write_text("[model]\ndim = 64\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\nvocab_size = 256\n")
    assert param_count(load_model(str(run_cfg))) == 131392
    shape = tmp_path / "gpt.toml"
    shape.write_text(
        '[model]\nkind = "gpt"\nn_layers = 2\nhidden = 64\nn_heads = 4\nn_kv_heads = 4\nffn = 256\n'
        "vocab = 100\nseq_len = 32\ntie_embeddings = true\n"
    )
    # per layer 12h^2 + 13h = 49152 + 832; embeddings 100*64 + 32*64; final LayerNorm 128
    assert param_count(load_model(str(shape))) == 2 * (49152 + 832) + 6400 + 2048 + 128


def test_missing_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_model("/nonexistent/model.toml")


def test_moe_presets_have_their_published_sizes_and_the_search_spreads_their_experts() -> None:
    """Mixtral-8x7B: 46.7B parameters, 12.9B active per token (Jiang et al. 2024); the DeepSeek-V3-
    like shape (multi-head attention in place of MLA): 671B and 37B published, within 1% and 5%.
    On 16 H100s the search's best Mixtral layout splits the experts (ep > 1)."""
    from meshtrain.model.math import matmul_params
    from meshtrain.planner.evaluate import Workload
    from meshtrain.planner.search import search

    for name, total, active, slack in (("mixtral-8x7b", 46.7e9, 12.9e9, 0.01), ("deepseek-v3-like", 671e9, 37e9, 0.05)):
        shape = MODELS[name]
        assert abs(param_count(shape) / total - 1) < 0.01, name
        # active: the matmul weights a token meets, plus the input embedding it looks up
        assert abs((matmul_params(shape) + shape.vocab * shape.hidden) / active - 1) < slack, name
    best = search(Workload(MODELS["mixtral-8x7b"], CLUSTERS["h100-80gb"], 16, 32, 4096)).ranked[0]
    assert best.layout.ep > 1, best.layout
