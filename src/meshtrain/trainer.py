"""The training loop: one `Trainer` per rank, built from a validated Config and a DistEnv.

It knows no parallelism by name: the build path (meshtrain.build) hands it the model parts, the
gradient engine and a step runner, and every step goes through those three.

Loss convention: each micro-batch's summed token cross-entropy is divided by the number of tokens in
the whole global batch. Summing those gradients over micro-steps and ranks therefore yields exactly
the gradient of the global mean loss, whatever the layout: the basis of the equivalence tests.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from meshtrain import checkpoint as ckpt
from meshtrain.accounting import CommStats, human_bytes, tensor_bytes
from meshtrain.build import DTYPES, build_parallel
from meshtrain.config import Config
from meshtrain.core.runner import Batch
from meshtrain.data import BatchSampler, build_dataset, build_tokenizer
from meshtrain.distributed import DistEnv
from meshtrain.faults import maybe_fail
from meshtrain.logs import get_logger
from meshtrain.metrics import MetricsWriter, ProgressBar, detect_peak_tflops, peak_rss_bytes
from meshtrain.model import count_params
from meshtrain.model.math import flops_per_token
from meshtrain.optim import AdamW, lr_at
from meshtrain.topology import Topology


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.logging.run_dir)
        self.console = Console(stderr=False)
        self.log = get_logger(env.rank, env.world_size, self.console if env.rank == 0 else None)
        if cfg.training.deterministic:
            torch.use_deterministic_algorithms(True)
        self.topo = Topology.build(cfg.parallel.degrees, env.device)
        self.stats = CommStats()
        self.parallel = build_parallel(cfg, self.topo, env.device, self.stats)
        self.engine, self.runner = self.parallel.engine, self.parallel.runner
        self.optim = AdamW(self.engine.optim_params(), cfg.optimizer, no_decay=self.engine.no_decay())
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.dataset = build_dataset(cfg.data, self.tokenizer, cfg.training.seq_len, cfg.training.seed)
        self.sampler = BatchSampler(
            len(self.dataset),
            cfg.training.global_batch,
            cfg.training.micro_batch,
            self.topo.local_rank("dp"),
            self.topo.size("dp"),
            cfg.training.seed,
        )
        self.step = 0
        self.ckpt_root = self.run_dir / "checkpoints"
        self.global_tokens = cfg.training.global_batch * cfg.training.seq_len
        dtype = DTYPES[cfg.training.dtype]
        self.peak_flops = 1e12 * (cfg.logging.peak_tflops or detect_peak_tflops(env.device, dtype))
        self.flops_per_token = flops_per_token(cfg.model, cfg.training.seq_len)

    # ---- state -------------------------------------------------------------------------------
    def app_state(self) -> dict[str, Any]:
        return {
            "model": self.engine.model_state_dict(),
            "optim": self.engine.optim_state_dict(self.optim.state_dict()),
            "train": {"step": torch.tensor(self.step)},
        }

    def maybe_resume(self) -> None:
        path = ckpt.latest(self.ckpt_root) if self.cfg.checkpoint.resume == "auto" else None
        if path is None:
            return
        state = self.app_state()
        meta = ckpt.load(path, state)
        self.optim.load_state_dict(state["optim"])
        self.step = int(state["train"]["step"])
        self.log.info(
            f"resumed from {path} (step {self.step}, {meta['sampler']['sequences_consumed']:,} sequences seen)"
        )

    def save(self) -> None:
        meta = {
            "step": self.step,
            "sampler": self.sampler.state(self.step),
            "layout": self.topo.describe(),
            "world_size": self.env.world_size,
        }
        path = ckpt.save(self.ckpt_root, self.step, self.app_state(), meta, self.cfg.checkpoint.keep)
        self.log.info(f"saved checkpoint {path}")

    def model_state_bytes(self) -> int:
        return tensor_bytes(self.engine.state_tensors() + self.optim.state_tensors())

    # ---- one optimizer step -------------------------------------------------------------------
    def batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of optimizer step `step`."""
        return [Batch(*self.dataset.batch(idx)) for idx in self.sampler.rank_indices(step)]

    def train_step(self) -> dict[str, Any]:
        t = self.cfg.training
        start = time.perf_counter()
        loss_sum = self.runner.run(self.batches(self.step))
        self.engine.finish()
        grad_norm = float(self.engine.grad_norm())
        if t.grad_clip and grad_norm > t.grad_clip:
            self.engine.scale_grads(t.grad_clip / (grad_norm + 1e-6))
        lr = lr_at(self.step, t)
        self.optim.step(self.engine.optim_grads(), lr)
        self.engine.after_step()
        self.engine.zero_grad()
        loss_mean = self.parallel.reduce_loss(loss_sum) / self.global_tokens
        elapsed = time.perf_counter() - start
        self.step += 1
        return self._record(loss_mean, lr, grad_norm, elapsed)

    def _record(self, loss: float, lr: float, grad_norm: float, elapsed: float) -> dict[str, Any]:
        tps = self.global_tokens / elapsed
        rec: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tps,
            "mfu": tps * self.flops_per_token / (self.peak_flops * self.env.world_size),
            "step_time_s": elapsed,
            "mem_model_state_bytes": self.model_state_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
        }
        if self.env.device.type == "cuda":
            rec["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(self.env.device)
        rec.update(self.runner.metrics())
        rec.update(self.engine.step_metrics())
        rec.update(self.stats.snapshot_and_reset())
        return rec

    # ---- the loop -------------------------------------------------------------------------------
    def summary(self) -> str:
        n_params = count_params(self.cfg.model)
        c = self.cfg
        runner = self.runner.describe()
        return (
            f"model {n_params / 1e6:.2f}M params ({c.model.n_layers} layers, dim {c.model.dim}) | layout "
            f"{self.topo.describe()} on {self.env.world_size} x {self.env.device.type} ({self.env.backend}) | "
            f"batch {c.training.global_batch} x {c.training.seq_len} tokens = {c.training.micro_batch} micro x "
            f"{c.training.grad_accum} accum x {self.topo.size('dp')} dp | model states "
            f"{human_bytes(self.model_state_bytes())}/rank | data {len(self.dataset):,} sequences"
            + (f" | {runner}" if runner else "")
        )

    def fit(self) -> list[dict[str, Any]]:
        self.maybe_resume()
        is_root = self.env.rank == 0
        own = self.run_dir / f"metrics.rank{self.env.rank}.jsonl"
        writer = MetricsWriter([self.run_dir / "metrics.jsonl", own] if is_root else [own], truncate=self.step == 0)
        self.log.info(self.summary())
        self.log.info(self.engine.describe())
        bar = ProgressBar(
            self.console, self.cfg.training.steps, self.step, enabled=is_root and self.cfg.logging.progress
        )
        history = []
        try:
            while self.step < self.cfg.training.steps:
                rec = self.train_step()
                history.append(rec)
                writer.write(rec)
                bar.update(self.step, rec)
                self._log_step(rec)
                self._maybe_save()
                maybe_fail("after_step", self.step)
        finally:
            bar.close()
        self.runner.close()
        return history

    def _log_step(self, rec: dict[str, Any]) -> None:
        if rec["step"] % self.cfg.logging.log_interval == 0 or rec["step"] == self.cfg.training.steps:
            self.log.info(
                f"step {rec['step']:>5} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | grad norm "
                f"{rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | MFU {100 * rec['mfu']:.2f}% | "
                f"model states {human_bytes(rec['mem_model_state_bytes'])} | peak RSS "
                f"{human_bytes(rec['peak_rss_bytes'])}"
            )

    def _maybe_save(self) -> None:
        every = self.cfg.checkpoint.interval
        if every and (self.step % every == 0 or self.step == self.cfg.training.steps):
            self.save()
