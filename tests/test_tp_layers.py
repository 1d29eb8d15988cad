"""Tensor-parallel layers against their single-device twins, on real gloo ranks (tp = 2 and 4).

One launch per world size runs every check: the parallel layers (forward output, input and weight
gradients), the communication a block sends against Narayanan's counts, the activations it saves
against Korthikanti's per-layer formula (adjusted for this model, term by term, below), the
pipeline's B/W split of the parallel layers, and checkpoints moving between TP and non-TP. The
formulas are written here, and the bytes are also counted by a wrapper around torch.distributed.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn

from comm_counter import CommCounter
from dist_utils import spawn
from meshtrain.accounting import CommStats
from meshtrain.activation_checkpoint import apply_activation_checkpointing
from meshtrain.config import ModelConfig, OptimizerConfig
from meshtrain.core.weight_grads import WeightGradQueue, split_weight_grads
from meshtrain.data_parallel import DataParallel
from meshtrain.model import build_model
from meshtrain.optim import AdamW
from meshtrain.tensor_parallel import (
    LLAMA_PLAN,
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelEngine,
    VocabParallelEmbedding,
    apply_tensor_parallel,
    vocab_parallel_cross_entropy,
)
from meshtrain.tensor_parallel.comm import TPComm, all_gather_dim, gather_seq, scatter_seq
from meshtrain.tools.tp_measure import saved_bytes_per_block

pytestmark = pytest.mark.dist
CFG = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256, max_seq_len=64)
B, S = 2, 32
TOL = dict(rtol=1e-4, atol=1e-5)  # partial sums round differently from one matmul


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _chunk(t: torch.Tensor, comm: TPComm, dim: int) -> torch.Tensor:
    return t.chunk(comm.size, dim)[comm.rank]


def _mlp_twin() -> tuple[torch.Tensor, ...]:
    """A column -> gelu -> row MLP on one device: inputs, output, its gradient, and the leaves' grads."""
    x, wc, wr = torch.randn(B, 8, 12), torch.randn(16, 12), torch.randn(12, 16)
    xr, wcr, wrr = _leaf(x), _leaf(wc), _leaf(wr)
    ref = F.linear(F.gelu(F.linear(xr, wcr)), wrr)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    return x, wc, wr, ref.detach(), grad, xr.grad, wcr.grad, wrr.grad


def _check_column_and_row(comm: TPComm) -> None:
    x, wc, wr, ref, grad, gx, gwc, gwr = _mlp_twin()
    col, row = ColumnParallelLinear(wc, comm, False, entry=True), RowParallelLinear(wr, comm, False)
    xt = _leaf(x)
    hidden = col(xt)
    torch.testing.assert_close(hidden, _chunk(F.linear(x, wc), comm, -1), **TOL)
    out = row(F.gelu(hidden))
    torch.testing.assert_close(out, ref, **TOL)
    out.backward(grad)
    torch.testing.assert_close(xt.grad, gx, **TOL)  # f's backward all-reduce made it whole
    torch.testing.assert_close(col.weight.grad, _chunk(gwc, comm, 0), **TOL)
    torch.testing.assert_close(row.weight.grad, _chunk(gwr, comm, 1), **TOL)


def _check_sequence_parallel_region(comm: TPComm) -> None:
    """scatter -> column (all-gather in, shard saved) -> row (reduce-scatter out) -> gather."""
    x, wc, wr, ref, grad, gx, gwc, gwr = _mlp_twin()
    col, row = ColumnParallelLinear(wc, comm, True, entry=True), RowParallelLinear(wr, comm, True)
    xt = _leaf(x)
    shard_out = row(F.gelu(col(scatter_seq(xt, comm))))
    torch.testing.assert_close(shard_out, _chunk(ref, comm, 1), **TOL)
    out = gather_seq(shard_out, comm)
    torch.testing.assert_close(out, ref, **TOL)
    out.backward(grad)
    torch.testing.assert_close(xt.grad, gx, **TOL)
    torch.testing.assert_close(col.weight.grad, _chunk(gwc, comm, 0), **TOL)
    torch.testing.assert_close(row.weight.grad, _chunk(gwr, comm, 1), **TOL)


def _async_pair(comm: TPComm, wc: torch.Tensor, wr: torch.Tensor, ring: bool) -> tuple[nn.Module, nn.Module]:
    return ColumnParallelLinear(wc, comm, True, entry=True, async_tp=ring), RowParallelLinear(wr, comm, True, ring)


def _check_async_region_matches_sp(comm: TPComm) -> None:
    """Collective matmul against plain SP (and, through it, the single device): forward, input and
    weight gradients within 1e-5, and only ring steps on the wire: t - 1 sends per decomposed
    collective, of one chunk each, where plain SP issues one all-gather or reduce-scatter."""
    x, wc, wr, ref, grad, *_ = _mlp_twin()
    results = []
    for ring in (False, True):
        stats = CommStats()
        ring_comm = TPComm(comm.group, stats)
        col, row = _async_pair(ring_comm, wc, wr, ring)
        xt = _leaf(x)
        shard_out = row(F.gelu(col(scatter_seq(xt, ring_comm))))
        shard_out.backward(_chunk(grad, comm, 1))
        results.append((shard_out.detach(), xt.grad, col.weight.grad, row.weight.grad, dict(stats.payload)))
    (out, gxs, gcs, grs, plain), (aout, agx, agc, agr, counted) = results
    torch.testing.assert_close(aout, _chunk(ref, comm, 1), **TOL)
    for got, want in ((aout, out), (agx, gxs), (agc, gcs), (agr, grs)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    t, chunk = comm.size, B * (8 // comm.size) * 12 * 4  # one sequence chunk of the region's input
    # forward: gather in, reduce-scatter out; backward: the row's gather, the column's reduce-scatter
    # and re-gather; the scatter_seq of this test's backward is an all-gather of its own
    assert counted == {"p2p": 5 * (t - 1) * chunk, "all_gather": t * chunk}, counted
    assert plain == {"all_gather": 4 * t * chunk, "reduce_scatter": 2 * t * chunk}, plain


def _check_split_backward(comm: TPComm, sp: bool, ring: bool = False) -> None:
    """The pipeline's B/W split: B leaves the parallel layers' weight gradients to W (which, under SP,
    re-gathers the stored input shard) and the input gradient is complete without them."""
    x, wc, wr, _, grad, gx, gwc, gwr = _mlp_twin()
    col, row = ColumnParallelLinear(wc, comm, sp, entry=True, async_tp=ring), RowParallelLinear(wr, comm, sp, ring)
    queue, deferred = WeightGradQueue(), []
    assert split_weight_grads(nn.ModuleList([col, row]), queue) == 2
    xt = _leaf(x)
    out = row(F.gelu(col(scatter_seq(xt, comm) if sp else xt)))
    queue.target = deferred  # as the executor does around a B
    (gather_seq(out, comm) if sp else out).backward(grad)
    queue.target = None
    torch.testing.assert_close(xt.grad, gx, **TOL)
    assert col.weight.grad is None and row.weight.grad is None and len(deferred) == 2
    for weight_grad in deferred:  # W
        weight_grad()
    torch.testing.assert_close(col.weight.grad, _chunk(gwc, comm, 0), **TOL)
    torch.testing.assert_close(row.weight.grad, _chunk(gwr, comm, 1), **TOL)


def _check_embedding(comm: TPComm, sp: bool) -> None:
    vocab, ids = 32, torch.randint(0, 32, (B, 8))
    weight = torch.randn(vocab, 12)
    wr = _leaf(weight)
    ref = F.embedding(ids, wr)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    emb = VocabParallelEmbedding(weight, comm, sp)
    out = emb(ids)
    torch.testing.assert_close(out, _chunk(ref, comm, 1) if sp else ref, **TOL)
    out.backward(_chunk(grad, comm, 1) if sp else grad)
    torch.testing.assert_close(emb.weight.grad, _chunk(wr.grad, comm, 0), **TOL)


def _check_cross_entropy_and_eval_head(comm: TPComm) -> None:
    logits, targets = torch.randn(B, 8, 32) * 3, torch.randint(0, 32, (B, 8))
    lr = _leaf(logits)
    ref = F.cross_entropy(lr.flatten(0, 1), targets.flatten(), reduction="sum")
    ref.backward()
    local = _leaf(_chunk(logits, comm, -1))
    loss = vocab_parallel_cross_entropy(local, targets, comm)
    torch.testing.assert_close(loss, ref, **TOL)
    loss.backward()
    torch.testing.assert_close(local.grad, _chunk(lr.grad, comm, -1), **TOL)
    head, x = (
        ColumnParallelLinear(torch.randn(32, 12), comm, True, entry=True, gather_in_eval=True),
        torch.randn(B, 5, 12),
    )
    with torch.no_grad():  # eval: whole logits, any sequence length (5 is not divisible by tp)
        torch.testing.assert_close(head.eval()(x), F.linear(x, all_gather_dim(head.weight, comm, 0)), **TOL)


def _tp_model(sp: bool, seed: int = 3, ring: bool = False):
    model, stats = build_model(CFG, seed=seed), CommStats()
    tp = apply_tensor_parallel(model, dist.group.WORLD, LLAMA_PLAN, sp, stats, async_tp=ring)
    return model, tp, stats


def block_traffic(b: int, s: int, h: int, sp: bool, t: int, ring: bool = False) -> dict[str, int]:
    """Payload bytes of one block's TP collectives per microbatch, forward and backward (fp32).
    Narayanan et al.: two regions (attention, MLP), an all-reduce of b*s*h leaving each forward and
    one entering each backward. SP (Korthikanti et al.): each becomes an all-gather / reduce-scatter
    pair, and each region's input, kept as a sequence shard, is all-gathered again in backward.
    Async TP: each of those ten collectives is a ring of t - 1 sends of one chunk (b*s/t*h), and
    q, k, v (gate, up) share their region's rings."""
    x = b * s * h * 4
    if ring:
        return {"p2p": 10 * (t - 1) * x // t}
    return {"all_gather": 6 * x, "reduce_scatter": 4 * x} if sp else {"all_reduce": 4 * x}


def _check_block_comm(world: int, sp: bool, ring: bool = False) -> None:
    model, tp, _ = _tp_model(sp, ring=ring)
    data = torch.randint(0, CFG.vocab_size, (B, S + 1))
    counter = CommCounter().install()
    tp.loss_fn(model(data[:, :-1], torch.arange(S)), data[:, 1:]).backward()
    if sp:
        tp.sum_partial_grads()  # once per step: every norm weight, in one all-reduce
    counter.uninstall()
    for block in ("layers.0", "layers.1"):
        assert dict(tp.scopes[block].payload) == block_traffic(B, S, CFG.dim, sp, world, ring), block
    if sp:
        norms = (2 * CFG.n_layers + 1) * CFG.dim * 4
        assert dict(tp.scopes["partial grads"].payload) == {"all_reduce": norms}
    # what the scopes report is what torch.distributed was handed, kind by kind
    reported: dict[str, int] = defaultdict(int)
    for scope in tp.scopes.values():
        for kind, nbytes in scope.payload.items():
            reported[kind] += nbytes
    assert {k: v for k, v in counter.bytes.items() if k != "scalar"} == dict(reported)


def tp_block_saved_bytes_per_token(cfg: ModelConfig, tp: int, sp: bool, act: int = 4) -> float:
    """What one block saves for backward per token on one of tp ranks (Korthikanti et al. 2022, Table
    2, adjusted as in test_model.py: no dropout, SDPA's fp32 log-sum-exp, GQA, SwiGLU, unfused
    RMSNorm). Tensor parallelism splits the heads' and the MLP's tensors; the norms' and the regions'
    inputs are split only under sequence parallelism."""
    d, kv, f = cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    rep = tp if sp else 1
    replicated = 2 * (2 * d * act + 4) + d * act + d * act  # two norms, the attention's and MLP's inputs
    split = (d + kv) * act + kv * act + d * act + cfg.n_heads * 4 + 4 * f * act  # q k, v, output, lse, hidden
    return replicated / rep + split / tp


def _check_activations(world: int, sp: bool, ring: bool = False) -> None:
    model, _, _ = _tp_model(sp, ring=ring)
    data = torch.randint(0, CFG.vocab_size, (B, S))
    per_block = saved_bytes_per_block(model, model.model.layers, lambda: model(data, torch.arange(S)))
    # the last block: the first one also holds the RoPE tables that SP indexes by position
    measured = per_block[str(CFG.n_layers - 1)]
    formula = B * S * tp_block_saved_bytes_per_token(CFG, world, sp)
    assert measured == formula, (world, sp, ring, measured, formula)


def _check_tied_model_with_recompute(rank: int, world: int, ring: bool = False) -> None:
    """Tied embedding and head share one vocabulary shard; its gradient gets both contributions.
    With SP and recomputation: the re-gathered shards come from the recomputed forward (and, under
    async TP, the recomputed rings' outputs)."""
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    data = torch.randint(0, CFG.vocab_size, (B, S + 1))
    ref = build_model(cfg, seed=5)
    F.cross_entropy(ref(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten(), reduction="sum").backward()
    model = build_model(cfg, seed=5)
    tp = apply_tensor_parallel(model, dist.group.WORLD, LLAMA_PLAN, True, CommStats(), async_tp=ring)
    apply_activation_checkpointing(model.model.layers, "full", 1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tp.loss_fn(model(data[:, :-1], torch.arange(S)), data[:, 1:]).backward()
    tp.sum_partial_grads()
    for name, p in model.named_parameters():
        want = dict(ref.named_parameters())[name].grad
        dim = tp.shard_dims.get(name)
        torch.testing.assert_close(p.grad, want if dim is None else want.chunk(world, dim)[rank], **TOL, msg=name)


def _engine(model, tp) -> TensorParallelEngine:
    return TensorParallelEngine(DataParallel(model, None, CommStats()), model, tp)


def _check_checkpoints(rank: int, root: Path) -> None:
    """TP -> full and full -> TP, for weights and Adam moments, through DCP."""
    model, tp, _ = _tp_model(sp=False, seed=3)
    engine = _engine(model, tp)
    optim = AdamW(engine.optim_params(), OptimizerConfig())
    for name, m in zip(optim.names, optim.exp_avg):
        m.copy_(dict(model.named_parameters())[name].detach() * 2)
    dcp.save(
        {"model": engine.model_state_dict(), "optim": engine.optim_state_dict(optim.state_dict())},
        checkpoint_id=root / "tp",
    )
    full, want = build_model(CFG, seed=99), build_model(CFG, seed=3)
    full_optim = AdamW(list(full.named_parameters()), OptimizerConfig())
    dcp.load({"model": dict(full.named_parameters()), "optim": full_optim.state_dict()}, checkpoint_id=root / "tp")
    for (name, p), (_, q), m in zip(full.named_parameters(), want.named_parameters(), full_optim.exp_avg):
        torch.testing.assert_close(p, q, msg=name)
        torch.testing.assert_close(m, q * 2, msg=name)
    dcp.save({"model": dict(want.named_parameters())}, checkpoint_id=root / "full")
    other, tp2, _ = _tp_model(sp=True, seed=7)
    dcp.load({"model": _engine(other, tp2).model_state_dict()}, checkpoint_id=root / "full")
    for name, p in other.named_parameters():
        dim = tp2.shard_dims.get(name)
        q = dict(want.named_parameters())[name]
        torch.testing.assert_close(p, q if dim is None else q.chunk(dist.get_world_size(), dim)[rank], msg=name)


def _run_all(rank: int, world: int, tmp: str) -> None:
    torch.manual_seed(0)  # the same data on every rank, as TP needs
    comm = TPComm(dist.group.WORLD, CommStats())
    _check_column_and_row(comm)
    _check_sequence_parallel_region(comm)
    for sp in (False, True):
        _check_split_backward(comm, sp)
        _check_embedding(comm, sp)
        _check_block_comm(world, sp)
        _check_activations(world, sp)
    _check_async_region_matches_sp(comm)
    _check_split_backward(comm, True, ring=True)
    _check_block_comm(world, True, ring=True)
    _check_activations(world, True, ring=True)
    _check_cross_entropy_and_eval_head(comm)
    for ring in (False, True):
        _check_tied_model_with_recompute(rank, world, ring)
    _check_checkpoints(rank, Path(tmp))


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_layers_match_single_device(world: int, tmp_path: Path) -> None:
    spawn(_run_all, world, str(tmp_path))
