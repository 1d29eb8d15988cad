"""The peer for bench_diloco: torchft's DiLoCo (torchft.local_sgd.DiLoCo, torchft 0.2.0) on CPU/gloo,
training the same model on the same data with the same hyperparameters as meshtrain's DiLoCo.

Layout: 2 replica groups ("islands") x 2 ranks. Inside a group, torch DDP (gloo) averages the
gradients of the group's mean token loss; across groups, torchft's Manager (one per rank, quorum
through a torchft Lighthouse run in this process, `torchft._torchft.LighthouseServer`, the same
server as the `torchft_lighthouse` binary) all-reduces the pseudo-gradients over a torchft
ProcessGroupGloo, every H inner steps, and steps the outer SGD.

Matched to meshtrain (configs/default.toml, src/meshtrain/optim.py, meshtrain.trainer):
- model: meshtrain.model.build_model(cfg.model, seed=cfg.training.seed), fp32, identical initial weights
  on every rank (so torchft's init_sync is off);
- data: meshtrain.data's dataset and BatchSampler; rank (group g, rank j) samples with rank=g*2+j,
  size=4, i.e. group g trains on the g-th half of each global batch, as meshtrain's island g does;
- inner: torch.optim.AdamW(betas, eps from [optimizer]; weight decay on matrices only, as meshtrain's
  no_decay = the <2-d parameters), lr = meshtrain.optim.lr_at(step) every step, gradients clipped to
  training.grad_clip on the group's own gradient norm (torch.nn.utils.clip_grad_norm_: the same
  max/(norm+1e-6) factor meshtrain applies);
- outer: torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True), one fragment (the whole model), sync every H.

Bytes: every tensor handed to Manager.allreduce is counted (numel x element size: fp32, torchft's
should_quantize needs triton, absent on CPU) per rank; the wire bytes apply the ring model's 2(K-1)/K
with K = the quorum's participants. torchft all-reduces the whole model from every rank of a group
with its counterpart in the other group, so a group of 2 ranks sends 2 copies per sync.

Final loss: the validation loss (the same first eval_batches x global_batch sequences of the same
split as meshtrain's val_loss, token mean), evaluated after the last step (a sync step when H divides
the steps) on group 0's rank 0.

    python benchmarks/diloco_peer.py --steps 200 --inner-steps 10 --out peer.json [--set data.val_fraction=0.05 ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust side logs every quorum at info

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from meshtrain.config import Config, load_config

GROUPS, GROUP_SIZE = 2, 2
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9  # meshtrain's [diloco] defaults (docs: notes/diloco-design.md)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def _config(overrides: list[str]) -> Config:
    return load_config(ROOT / "configs" / "default.toml", overrides)


def _val_loss(cfg: Config, model: torch.nn.Module, val: Any) -> float:
    """meshtrain.evaluation's convention: the first eval_batches global batches of the split, token mean."""
    from meshtrain.evaluation import ValSampler
    from meshtrain.loss import cross_entropy_sum

    t = cfg.training
    sampler = ValSampler(len(val), t.global_batch, t.micro_batch, 0, 1, t.seed)
    total = 0.0
    with torch.no_grad():
        for b in range(t.eval_batches):
            for idx in sampler.rank_indices(b):
                x, y = val.batch(idx)
                total += float(cross_entropy_sum(model(x), y))
    return total / (t.eval_batches * t.global_batch * t.seq_len)


def _worker(
    rank: int, overrides: list[str], inner_steps: int, lighthouse: str, store_ports: list[int], out: str
) -> None:
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    from meshtrain.data import BatchSampler, build_dataset, build_tokenizer
    from meshtrain.loss import cross_entropy_sum
    from meshtrain.model import build_model
    from meshtrain.optim import lr_at

    logging.getLogger("torchft").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (GROUPS * GROUP_SIZE)))  # as `meshtrain train`
    cfg = _config(overrides)
    t, o = cfg.training, cfg.optimizer
    group, grank = divmod(rank, GROUP_SIZE)
    port = store_ports[group]
    store = dist.TCPStore("localhost", port, GROUP_SIZE, is_master=False, wait_for_workers=False)
    dist.init_process_group("gloo", store=dist.PrefixStore("inner", store), rank=grank, world_size=GROUP_SIZE)

    model = build_model(cfg.model, "cpu", seed=t.seed)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    inner = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    outer = torch.optim.SGD(model.parameters(), lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True)

    tok = build_tokenizer(cfg.data.tokenizer)
    data = build_dataset(cfg.data, tok, t.seq_len, t.seed)
    sampler = BatchSampler(len(data), t.global_batch, t.micro_batch, rank, GROUPS * GROUP_SIZE, t.seed)
    island_tokens = t.global_batch // GROUPS * t.seq_len

    timeout = timedelta(seconds=120)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=lambda sd: (model.load_state_dict(sd["model"]), inner.load_state_dict(sd["inner"])),
        state_dict=lambda: {"model": model.state_dict(), "inner": inner.state_dict()},
        min_replica_size=GROUPS,
        use_async_quorum=False,  # DiLoCo requires it
        init_sync=False,  # every rank builds the same initial weights from the seed
        replica_id=f"island{group}",
        store_addr="localhost",
        store_port=port,
        rank=grank,
        world_size=GROUP_SIZE,
        lighthouse_addr=lighthouse,
        hostname="localhost",
        timeout=timeout,
        quorum_timeout=timeout,
        connect_timeout=timeout,
    )
    sent = {"payload": 0.0, "wire": 0.0, "syncs": 0}
    allreduce = manager.allreduce

    def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        k = manager.num_participants()
        nbytes = tensor.numel() * tensor.element_size()
        sent["payload"] += nbytes
        sent["wire"] += nbytes * 2 * (k - 1) / k
        return allreduce(tensor, *args, **kwargs)

    manager.allreduce = counted  # every tensor torchft's DiLoCo all-reduces passes here

    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    with DiLoCo(manager, [model], inner, outer, sync_every=inner_steps, pin_memory=False):
        for step in range(t.steps):
            t0 = time.perf_counter()
            before = sent["wire"]
            inner.zero_grad()
            loss_sum = torch.zeros((), dtype=torch.float64)
            for idx in sampler.rank_indices(step):
                x, y = data.batch(idx)
                loss = cross_entropy_sum(ddp(x), y)
                # DDP averages over the group's 2 ranks: x2 makes it the gradient of the group's mean token loss
                (loss * (GROUP_SIZE / island_tokens)).backward()
                loss_sum += loss.detach().double()
            dist.all_reduce(loss_sum)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf")))
            lr = lr_at(step, t)
            for g in inner.param_groups:
                g["lr"] = lr
            inner.step()  # torchft's post-step hook runs the outer step every H steps
            records.append(
                {
                    "step": step + 1,
                    "loss": float(loss_sum) / island_tokens,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "step_time_s": time.perf_counter() - t0,
                    "outer_wire_bytes": sent["wire"] - before,
                    "manager_step": manager.current_step(),
                }
            )
    wall = time.perf_counter() - start
    result: dict[str, Any] = {"rank": rank, "group": group, "wall_s": wall, "bytes": sent, "records": records}
    if rank == 0 and t.eval_interval and cfg.data.val_fraction > 0:
        result["val_loss"] = _val_loss(cfg, model, build_dataset(cfg.data, tok, t.seq_len, t.seed, split="val"))
    Path(f"{out}.rank{rank}").write_text(json.dumps(result))
    manager.shutdown(wait=False)
    dist.destroy_process_group()
    os._exit(0)  # skip gloo's occasionally aborting interpreter teardown


def run_peer(overrides: list[str], inner_steps: int, workdir: Path) -> dict[str, Any]:
    """Train torchft's DiLoCo (2 groups x 2 ranks); every rank's result, rank 0's first."""
    from torchft._torchft import LighthouseServer

    lighthouse = LighthouseServer(bind=f"[::]:{_free_port()}", min_replicas=GROUPS, join_timeout_ms=60_000)
    stores = [
        dist.TCPStore("localhost", 0, GROUP_SIZE + 1, is_master=True, wait_for_workers=False) for _ in range(GROUPS)
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    out = str(workdir / "peer")
    try:
        mp.spawn(
            _worker,
            args=(overrides, inner_steps, lighthouse.address(), [s.port for s in stores], out),
            nprocs=GROUPS * GROUP_SIZE,
            join=True,
        )
    finally:
        lighthouse.shutdown()
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(GROUPS * GROUP_SIZE)]
    return {
        "ranks": ranks,
        "val_loss": ranks[0].get("val_loss"),
        "wall_s": max(r["wall_s"] for r in ranks),
        # group 0's ranks summed: what island 0 sends to island 1 over the run
        "outer_wire_bytes": sum(r["bytes"]["wire"] for r in ranks if r["group"] == 0),
        "syncs": sum(1 for r in ranks[0]["records"] if r["outer_wire_bytes"] > 0),
        "records": ranks[0]["records"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--inner-steps", type=int, default=10, help="H: inner steps between outer syncs")
    p.add_argument("--set", action="append", default=[], help="config overrides, as `meshtrain train --set`")
    p.add_argument("--out", help="write the result here (JSON)")
    args = p.parse_args()
    import tempfile

    overrides = [f"training.steps={args.steps}", *args.set]
    with tempfile.TemporaryDirectory() as tmp:
        res = run_peer(overrides, args.inner_steps, Path(tmp))
    last = res["records"][-10:]
    print(
        f"torchft DiLoCo 2x2, H={args.inner_steps}, {args.steps} steps: val loss {res['val_loss']}, "
        f"last-10 train loss {sum(r['loss'] for r in last) / len(last):.4f}, "
        f"outer wire bytes from group 0 {res['outer_wire_bytes']:,.0f} over {res['syncs']} syncs, wall {res['wall_s']:.1f} s"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
