"""The training loop: one `Trainer` per rank, built from a validated Config and a DistEnv.

It knows no parallelism by name: the build path (meshtrain.build) hands it the model parts, the
gradient engine and a step runner, and every step goes through those three.

Loss convention: each micro-batch's summed token cross-entropy is divided by the number of tokens in
the whole global batch. Summing those gradients over micro-steps and ranks therefore yields exactly
the gradient of the global mean loss, whatever the layout: the basis of the equivalence tests.

Evaluation (training.eval_interval): after a step's record is taken, the runner's forward-only
`evaluate` runs the validation batches (meshtrain.evaluation) with the step hooks set aside, and
val_loss, val_ppl and the evaluation's own communication (val_comm_*) join that step's record, so
neither the step's figures nor the next step's training see it. Rank 0 writes each record to
metrics.jsonl and, with logging.tensorboard, to RUN_DIR/tb as TensorBoard scalars.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from meshtrain import checkpoint as ckpt
from meshtrain.accounting import CommStats, SlowLink, human_bytes, tensor_bytes
from meshtrain.build import DTYPES, build_parallel
from meshtrain.config import Config, dump_toml, launch_degrees
from meshtrain.core import comm
from meshtrain.core.runner import Batch
from meshtrain.data import BatchSampler, build_dataset, build_tokenizer
from meshtrain.data.dataset import Dataset
from meshtrain.distributed import DistEnv
from meshtrain.evaluation import ValSampler, is_eval_step, perplexity
from meshtrain.faults import fault_requested, maybe_fail
from meshtrain.hf.config import hf_dir
from meshtrain.hf.weights import load_hf_weights
from meshtrain.logs import get_logger
from meshtrain.metrics import MetricsWriter, ProgressBar, TensorBoardWriter, detect_peak_tflops, peak_rss_bytes
from meshtrain.model import count_params
from meshtrain.model.math import flops_per_token
from meshtrain.optim import lr_at
from meshtrain.resilience import StepGuard, Stragglers
from meshtrain.topology import Topology
from meshtrain.watchdog import Watchdog


def slow_link(cfg: Config, node_size: int) -> SlowLink | None:
    """The emulated link of [comm], if one is asked for, over nodes of `node_size` ranks."""
    c = cfg.comm
    if not (c.emulate_gbps or c.emulate_latency_ms):
        return None
    return SlowLink(c.emulate_gbps, c.emulate_latency_ms, node_size, c.emulate_scope)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.logging.run_dir)
        self.console = Console(stderr=False)
        self.log = get_logger(env.rank, env.world_size, self.console if env.rank == 0 else None)
        if cfg.training.deterministic:
            torch.use_deterministic_algorithms(True)
        joined = (cfg.diloco.island, cfg.parallel.diloco) if cfg.diloco.join else None
        self.topo = Topology.build(launch_degrees(cfg), env.device, cfg.parallel.node_size, joined)
        self.stats = CommStats(self.topo.node_size, env.rank)
        self.stats.log.link = slow_link(cfg, self.topo.node_size)
        self.parallel = build_parallel(cfg, self.topo, env.device, self.stats)
        self.engine, self.runner = self.parallel.engine, self.parallel.runner
        self.optim = self.parallel.optimizer
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.dataset = build_dataset(cfg.data, self.tokenizer, cfg.training.seq_len, cfg.training.seed)
        # the global batch spans every DiLoCo island: island k takes data ranks k*dp .. k*dp + dp - 1
        index, count = self.topo.data_rank()
        self.sampler = BatchSampler(
            len(self.dataset), cfg.training.global_batch, cfg.training.micro_batch, index, count, cfg.training.seed
        )
        self.val_sampler, self.val_dataset = self._validation()
        self.step = 0
        self.ckpt_root = self.run_dir / "checkpoints"
        self.global_tokens = cfg.training.global_batch * cfg.training.seq_len
        # what one step's (and one evaluation batch's) loss is averaged over: this island's share
        self.island_tokens = self.global_tokens // cfg.parallel.diloco
        dtype = DTYPES[cfg.training.dtype]
        self.peak_flops = 1e12 * (cfg.logging.peak_tflops or detect_peak_tflops(env.device, dtype))
        self.flops_per_token = flops_per_token(cfg.model, cfg.training.seq_len)
        r = cfg.resilience
        self.guard = StepGuard(r.max_skipped_steps, r.spike_sigma, r.spike_window)
        island = self.topo.group("island")
        self.stragglers = Stragglers(
            self.topo.degrees.island_size, r.straggler_factor, r.straggler_steps, self.stats, island
        )
        self.run_id = env.launch_id
        self.saver: ckpt.Saver | None = None
        # DiLoCo islands of one launch hold different weights between outer steps: island k > 0 keeps
        # its own copy (an island launched on its own has its own run folder, and needs no suffix)
        k = self.topo.coords["diloco"]
        self.state_suffix = f"@island{k}" if k else ""

    def _validation(self) -> tuple[ValSampler | None, Dataset | None]:
        t = self.cfg.training
        if not t.eval_interval:
            return None, None
        val = build_dataset(self.cfg.data, self.tokenizer, t.seq_len, t.seed, split="val")
        # every island evaluates its own parameters on the same batches, its share of the global batch each
        share = t.global_batch // self.cfg.parallel.diloco
        sampler = ValSampler(len(val), share, t.micro_batch, self.topo.local_rank("dp"), self.topo.size("dp"), t.seed)
        if sampler.wraps(t.eval_batches) and self.env.rank == 0:
            self.log.warning(
                f"the validation split holds {len(val)} sequences, fewer than training.eval_batches x {share} "
                f"= {t.eval_batches * share}: evaluation wraps around and counts some twice"
            )
        return sampler, val

    # ---- state -------------------------------------------------------------------------------
    def app_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            f"model{self.state_suffix}": self.engine.model_state_dict(),
            f"optim{self.state_suffix}": self.engine.optim_state_dict(self.optim.state_dict()),
            "train": {"step": torch.tensor(self.step)},
        }
        hooks = {k: v for hook in self.parallel.hooks for k, v in hook.state_dict().items()}
        if hooks:  # e.g. MoE's balancing biases
            state["hooks"] = hooks
        return state

    def maybe_resume(self) -> None:
        path = ckpt.latest(self.ckpt_root, warn=self.log.warning) if self.cfg.checkpoint.resume == "auto" else None
        if path is None:
            if self.cfg.model.init_from:  # a fresh fine-tune; a restarted one continues from its checkpoint
                directory = hf_dir(self.cfg.model.init_from)
                with self.stats.log.doing(f"loading Hugging Face weights from {directory}"):
                    load_hf_weights(self.engine.model_state_dict(), directory)
                self.log.info(f"initialised from {directory} (Hugging Face weights)")
            return
        state = self.app_state()
        with self.stats.log.doing(f"loading {path.name}"):
            meta = ckpt.load(path, state)
        self.optim.load_state_dict(state[f"optim{self.state_suffix}"])
        self.step = int(state["train"]["step"])
        self.run_id = meta.get("run_id", self.run_id)  # resuming continues that run: its checkpoints stay ours
        self.log.info(
            f"resumed from {path} (step {self.step}, {meta['sampler']['sequences_consumed']:,} sequences seen)"
        )

    def save(self) -> float:
        """Save a checkpoint of the current step; returns how long training stood still for it."""
        if self.saver is None:
            c = self.cfg.checkpoint
            self.saver = ckpt.Saver(
                self.ckpt_root,
                self.run_id,
                c.keep,
                dump_toml(self.cfg),
                c.async_save,
                lambda: comm.barrier(None, self.stats),
            )
        meta = {
            "step": self.step,
            "sampler": self.sampler.state(self.step),
            "layout": self.topo.describe(),
            "world_size": self.env.world_size,
        }
        start = time.perf_counter()
        with self.stats.log.doing(f"saving step {self.step}"):
            path = self.saver.save(self.step, self.app_state(), meta)
        stall = time.perf_counter() - start
        self.log.info(
            f"saved checkpoint {path} ({stall:.2f} s of training time{', writing on' if self.saver.pending else ''})"
        )
        return stall

    def model_state_bytes(self) -> int:
        return tensor_bytes(self.engine.state_tensors() + self.optim.state_tensors())

    # ---- one optimizer step -------------------------------------------------------------------
    def batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of optimizer step `step`."""
        return [Batch(*self.dataset.batch(idx)) for idx in self.sampler.rank_indices(step)]

    def train_step(self) -> dict[str, Any]:
        t = self.cfg.training
        start = time.perf_counter()
        self.stats.log.step = self.step + 1
        scale = self.runner.scale
        if fault_requested("nan_grad", self.step + 1):  # failure injection (meshtrain.faults): NaN gradients
            self.runner.scale = math.nan
        try:
            loss_sum = self.runner.run(self.batches(self.step))
        finally:
            self.runner.scale = scale
        self.engine.finish()
        grad_norm = float(self.engine.grad_norm())
        loss_mean = self.parallel.reduce_loss(loss_sum) / self.island_tokens
        lr = lr_at(self.step, t)
        # Both figures come out of collectives, so every rank takes the same decision.
        applied = self.guard.check(self.step + 1, loss_mean, grad_norm)
        for hook in self.parallel.hooks:
            hook.before_step(applied)
        # a runner may hold its gradient back a step (2BW's first step has none to apply yet)
        stepped = applied and self.runner.gradient_ready()
        if stepped:
            if t.grad_clip and grad_norm > t.grad_clip:
                self.engine.scale_grads(t.grad_clip / (grad_norm + 1e-6))
            self.optim.step(self.engine.optim_grads(), lr)
        elif not applied:
            self.log.warning(f"step {self.step + 1} skipped: {self.guard.last_reason}")
        # every hook runs (a list, not a short-circuiting any()): an outer step may change parameters too
        changed = [hook.after_optimizer(self.step + 1) for hook in self.parallel.hooks]
        if stepped or any(changed):
            self.engine.after_step()
        self.engine.zero_grad()
        elapsed = time.perf_counter() - start
        self.step += 1
        return self._record(loss_mean, lr, grad_norm, elapsed, applied)

    def evaluate(self) -> dict[str, Any]:
        """The validation loss of the current weights (meshtrain.evaluation), forward only."""
        if self.val_sampler is None or self.val_dataset is None:
            raise RuntimeError("evaluate() needs training.eval_interval > 0 (the validation split is not loaded)")
        n = self.cfg.training.eval_batches
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        with contextlib.ExitStack() as outside:
            for hook in self.parallel.hooks:
                outside.enter_context(hook.outside_training())
            for b in range(n):
                batches = [Batch(*self.val_dataset.batch(idx)) for idx in self.val_sampler.rank_indices(b)]
                loss_sum += self.runner.evaluate(batches)
        loss = self.parallel.reduce_loss(loss_sum) / (n * self.island_tokens)
        comm = {f"val_{key}": value for key, value in self.stats.snapshot_and_reset().items()}
        return {"val_loss": loss, "val_ppl": perplexity(loss), "val_time_s": time.perf_counter() - start, **comm}

    def _record(self, loss: float, lr: float, grad_norm: float, elapsed: float, applied: bool) -> dict[str, Any]:
        tps = self.global_tokens / elapsed
        times, warning = self.stragglers.figures(self.stragglers.gather(elapsed))
        if warning:
            self.log.warning(warning)
        rec: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tps,
            "mfu": tps * self.flops_per_token / (self.peak_flops * self.env.world_size),
            "step_time_s": elapsed,
            **times,
            "skipped": not applied,
            "skipped_steps": self.guard.skipped,
            "mem_model_state_bytes": self.model_state_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
        }
        if self.env.device.type == "cuda":
            rec["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(self.env.device)
        rec.update(self.runner.metrics())
        rec.update(self.engine.step_metrics())
        for hook in self.parallel.hooks:
            rec.update(hook.metrics())
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
        for hook in self.parallel.hooks:
            self.step = hook.start_step(self.step)
        is_root = self.env.rank == 0
        own = self.run_dir / f"metrics.rank{self.env.rank}.jsonl"
        # records after the checkpoint resumed from are replayed, so they go (none at all at step 0)
        writer = MetricsWriter([self.run_dir / "metrics.jsonl", own] if is_root else [own], keep_through=self.step)
        board = TensorBoardWriter(self.run_dir / "tb", self.step) if is_root and self.cfg.logging.tensorboard else None
        self.log.info(self.summary())
        self.log.info(self.engine.describe())
        for line in filter(None, (hook.describe() for hook in self.parallel.hooks)):
            self.log.info(line)
        bar = ProgressBar(
            self.console, self.cfg.training.steps, self.step, enabled=is_root and self.cfg.logging.progress
        )
        watchdog = self._watchdog()
        history = []
        try:
            while self.step < self.cfg.training.steps:
                self.stats.log.activity = f"between steps {self.step} and {self.step + 1}"
                maybe_fail("sleep", self.step + 1)
                with self.stats.log.doing(f"computing step {self.step + 1}"):
                    rec = self.train_step()
                if is_eval_step(self.step, self.cfg.training.eval_interval, self.cfg.training.steps):
                    with self.stats.log.doing(f"evaluating after step {self.step}"):
                        rec.update(self.evaluate())
                history.append(rec)
                # the record first: a checkpoint of step N must never exist without step N's record
                writer.write(rec)
                if board is not None:
                    board.write(rec)
                bar.update(self.step, rec)
                self._log_step(rec)
                self._maybe_save()
                maybe_fail("after_step", self.step)
            if self.saver is not None:
                self.saver.finish()
        finally:
            bar.close()
            if board is not None:
                board.close()
            if watchdog is not None:
                watchdog.stop()
        self.runner.close()
        return history

    def _watchdog(self) -> Watchdog | None:
        r = self.cfg.resilience
        if self.env.store is None or r.collective_timeout_s <= 0:
            return None
        return Watchdog(
            self.stats.log,
            self.env.store,
            self.env.rank,
            self.env.world_size,
            r.collective_timeout_s,
            r.heartbeat_s,
            self.run_dir,
        ).start()

    def _log_step(self, rec: dict[str, Any]) -> None:
        val = f" | val loss {rec['val_loss']:.4f} (ppl {rec['val_ppl']:.2f})" if "val_loss" in rec else ""
        if rec["step"] % self.cfg.logging.log_interval == 0 or rec["step"] == self.cfg.training.steps or val:
            self.log.info(
                f"step {rec['step']:>5} | loss {rec['loss']:.4f}{val} | lr {rec['lr']:.2e} | grad norm "
                f"{rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | MFU {100 * rec['mfu']:.2f}% | "
                f"model states {human_bytes(rec['mem_model_state_bytes'])} | peak RSS "
                f"{human_bytes(rec['peak_rss_bytes'])}"
            )

    def _maybe_save(self) -> None:
        every = self.cfg.checkpoint.interval
        if every and (self.step % every == 0 or self.step == self.cfg.training.steps):
            stall = self.save()
            if self.env.rank == 0:  # RUN_DIR/saves.jsonl: what each save cost the training loop
                with (self.run_dir / "saves.jsonl").open("a") as f:
                    f.write(
                        json.dumps({"step": self.step, "stall_s": stall, "async": self.cfg.checkpoint.async_save})
                        + "\n"
                    )
