"""Runs one rank's action list (from meshtrain.pipeline.schedules) over real point-to-point sends.

The executor follows the schedule's execution contract: it walks the list in order, posts each run
of consecutive comm actions as one `batch_isend_irecv` and waits for it, and never lets a compute
action wait for a peer. Per (stage, microbatch) it keeps only what the schedule still needs: the
stage input (whose gradient B sends back), the output until its backward, and nothing after. A sent
activation's storage is released at once: backward needs the output's autograd node, not its values.

It is this rank's step runner (meshtrain.core.runner.StepRunner) when the model is pipelined: the
trainer hands it the step's micro-batches like any other runner. Evaluation runs another list on the
same machinery: the forward half of GPipe (schedules.forward_only), F and its sends and receives only,
under no_grad, each stage input dropped once its forward has run. Gradients are reduced once per
step, after the last microbatch (the engine's set_sync(False) for the whole step, then finish()).
With `trace_path` set it records every compute action's (kind, stage, microbatch, start, end) and,
at close(), writes the last step's to that file; meshtrain.tools.trace reads it back.

Token slices (the terapipe schedule, `Layout.slices` > 1): a training step cuts every micro-batch
into slices along the sequence and the actions name units (slice j of microbatch i is unit
i*slices + j). Each stage keeps a sequence's keys and values (meshtrain.model.kv_cache.SliceKV)
from its first slice's forward to its first slice's backward: a slice attends to the earlier ones,
and its backward runs from its output and its keys and values together, with the gradients the
later slices' backwards left on them. Evaluation runs whole sequences (the layout without slices).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from meshtrain.accounting import CommStats
from meshtrain.core.engine import GradEngine
from meshtrain.core.runner import Autocast, Batch, BatchTransform, LossFn, keep_batch, with_positions
from meshtrain.core.weight_grads import WeightGradQueue
from meshtrain.model.kv_cache import SliceKV
from meshtrain.pipeline.comm import exchange
from meshtrain.pipeline.schedules import Action, Kind, Layout, TraceRecord, forward_only, group_steps

Key = tuple[int, int]  # (virtual stage, microbatch)


def _backward(outputs: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    # The engine call underneath torch.autograd.backward, minus its shape check: the output's
    # storage may already have been released after it was sent (Megatron does the same).
    filled = tuple(torch.ones_like(o) if g is None else g for o, g in zip(outputs, grads))
    torch.autograd.graph._engine_run_backward(tuple(outputs), filled, False, False, (), True, True)


def slice_batch(batch: Batch, slices: int) -> list[Batch]:
    """A micro-batch cut along the sequence into `slices` equal, consecutive token slices."""
    if batch.positions is None:
        raise ValueError("slice_batch needs a batch with explicit positions (runner.with_positions)")
    width = batch.tokens.shape[1] // slices
    cuts = [slice(j * width, (j + 1) * width) for j in range(slices)]
    return [Batch(batch.tokens[:, c], batch.targets[:, c], batch.positions[c]) for c in cuts]


@dataclass
class PipelineExecutor:
    stages: dict[int, nn.Module]
    actions: list[Action]
    layout: Layout
    group: dist.ProcessGroup
    stats: CommStats
    loss_fn: LossFn  # the last stage's: cross-entropy, or the vocab-parallel one under tensor parallelism
    act_shape: tuple[int, ...]
    """Of a stage output and its gradient, (batch, sequence, dim): the recv buffers. A token-sliced
    training step receives one slice at a time, sequence / slices of it."""
    device: torch.device
    act_dtype: torch.dtype = torch.float32
    """The residual stream's dtype, which stages exchange: fp32 under autocast; bf16 when ZeRO-3
    computes with bf16 weights (the embedding then looks up bf16 rows)."""
    autocast: Autocast = contextlib.nullcontext
    scale: float = 1.0  # 1 / tokens in the global batch: the loss convention of meshtrain.core.runner
    engine: GradEngine | None = None  # told to hold its reduction until finish(): once per step
    trace_path: Path | None = None
    trace_meta: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    prepare: BatchTransform = keep_batch
    """What to do to each micro-batch first (context parallelism: keep this rank's shard)."""
    queue: WeightGradQueue = field(default_factory=WeightGradQueue)
    """Where the stages' layers put deferred weight gradients (meshtrain.core.weight_grads.split_weight_grads)."""
    trace: list[TraceRecord] = field(default_factory=list)
    peak_inflight: float = 0.0
    eval_plans: dict[int, tuple[list[Action], list[list[int]]]] = field(default_factory=dict)
    """Forward-only action lists (and their comm batches) by microbatch count, built on first use."""
    training: bool = True
    """Whether the pass running is a training step (keeps what backward needs) or an evaluation."""

    def __post_init__(self) -> None:
        self.last = self.layout.num_stages - 1
        self.me = dist.get_rank(self.group)
        self.steps = group_steps(self.actions)
        self.slices = self.layout.slices
        self.whole = Layout(self.layout.pp, self.layout.ranks)  # evaluation's: whole sequences
        self.sliced, self.recv_shape = False, self.act_shape

    # ---- the StepRunner contract (meshtrain.core.runner) ----------------------------------------
    def run(self, batches: list[Batch]) -> torch.Tensor:
        """One optimizer step's forward and backward passes; returns this rank's summed token loss."""
        if self.engine is not None:
            self.engine.set_sync(False)  # the pipeline's gradients are reduced once, in finish()
        self.trace, self.inflight, self.peak_inflight = [], 0.0, 0.0
        return self._execute(self.actions, self.steps, batches, training=True)

    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        """The forward-only schedule (schedules.forward_only) over `batches`, under no_grad: this rank's
        summed token loss (nonzero on the last stage only). The trace and in-flight peak stay the step's."""
        if len(batches) not in self.eval_plans:
            actions = forward_only(self.whole, len(batches))[self.me]
            self.eval_plans[len(batches)] = (actions, group_steps(actions))
        actions, steps = self.eval_plans[len(batches)]
        with torch.no_grad():
            return self._execute(actions, steps, batches, training=False)

    def _execute(
        self, actions: list[Action], steps: list[list[int]], batches: list[Batch], training: bool
    ) -> torch.Tensor:
        self.batches = [self.prepare(with_positions(b, self.device)) for b in batches]
        self._slice(training)
        self._clear()
        self._walk(actions, steps, training)
        if self.in_flight():
            raise RuntimeError("pipeline schedule left work undone: it does not cover every microbatch")
        return self.loss_sum

    def _slice(self, training: bool) -> None:
        """TeraPipe: a training step's microbatches are cut into token slices, received slice by slice."""
        self.sliced = training and self.slices > 1
        b, seq, *rest = self.act_shape
        self.recv_shape = (b, seq // self.slices, *rest) if self.sliced else self.act_shape
        if self.sliced:
            self.batches = [part for b in self.batches for part in slice_batch(b, self.slices)]

    def _clear(self) -> None:
        self.kv: dict[Key, SliceKV] = {}  # (stage, microbatch): the keys and values its slices made
        self.inputs: dict[Key, torch.Tensor] = {}
        self.outputs: dict[Key, torch.Tensor] = {}
        self.grads: dict[Key, torch.Tensor] = {}
        self.outbox: dict[tuple[Kind, int, int], torch.Tensor] = {}
        self.deferred: dict[Key, list[Callable[[], None]]] = defaultdict(list)

    def in_flight(self) -> bool:
        """Whether any microbatch still holds state here (a stage input, an output, a gradient)."""
        return bool(self.inputs or self.outputs or self.grads or self.outbox or self.kv or any(self.deferred.values()))

    def _walk(self, actions: list[Action], steps: list[list[int]], training: bool) -> None:
        self.training = training
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        for step in steps:
            acts = [actions[i] for i in step]
            if acts[0].kind.is_comm:
                self._communicate(acts)
            elif training:
                # perf_counter is the host's monotonic clock, so ranks' traces line up.
                start = time.perf_counter()
                self._compute(acts[0])
                self.trace.append((acts[0].kind.value, acts[0].stage, acts[0].microbatch, start, time.perf_counter()))
            else:
                self._compute(acts[0])

    def metrics(self) -> dict[str, float]:
        return {"pp_peak_inflight": self.peak_inflight}

    def gradient_ready(self) -> bool:
        return True

    def describe(self) -> str:
        return self.summary

    def close(self) -> None:
        if self.trace_path is not None and self.trace:
            self.trace_path.parent.mkdir(parents=True, exist_ok=True)
            self.trace_path.write_text(json.dumps({**self.trace_meta, "records": self.trace}))

    # ---- communication ------------------------------------------------------------------------
    def _communicate(self, acts: list[Action]) -> None:
        sends, recvs, landed = [], [], []
        for a in acts:
            if a.peer is None:
                raise RuntimeError(f"{a} names no peer: every send and receive of a schedule must")
            if a.kind in (Kind.SEND_F, Kind.SEND_B):
                sends.append((self.outbox.pop((a.kind, a.stage, a.microbatch)), a.peer))
            else:
                buf = torch.empty(self.recv_shape, dtype=self.act_dtype, device=self.device)
                recvs.append((buf, a.peer))
                landed.append((a, buf))
        exchange(sends, recvs, self.group, self.stats)
        for a, buf in landed:
            if a.kind == Kind.RECV_F:
                self.inputs[(a.stage + 1, a.microbatch)] = buf.requires_grad_()
            else:
                self.grads[(a.stage - 1, a.microbatch)] = buf
        for tensor, _ in sends:
            tensor.untyped_storage().resize_(0)  # sent: only the autograd node is still needed

    # ---- compute ----------------------------------------------------------------------------
    def _compute(self, a: Action) -> None:
        key = (a.stage, a.microbatch)
        if a.kind == Kind.F:
            self._forward(key)
        elif a.kind in (Kind.B, Kind.BW):
            self._backward(key, split=a.kind == Kind.B)
        elif a.kind == Kind.W:
            for weight_grad in self.deferred.pop(key):
                weight_grad()
        else:
            raise ValueError(f"unknown pipeline action {a}")

    def _forward(self, key: Key) -> None:
        stage, mb = key
        batch = self.batches[mb]
        # a forward-only pass has no backward to hand the input's gradient to: the input goes now
        x = batch.tokens if stage == 0 else self.inputs[key] if self.training else self.inputs.pop(key)
        with self.autocast():
            if self.sliced:  # positions continue from the sequence's earlier slices, kept with their keys
                kv = self.kv.setdefault((stage, mb // self.slices), SliceKV(x.shape[1] * self.slices))
                out = self._module(key)(x, cache=kv)
            else:
                out = self._module(key)(x, batch.positions)
        if stage == self.last:
            loss = self.loss_fn(out, batch.targets)
            self.loss_sum += loss.detach().double().cpu()
            out = loss * self.scale
        elif self.layout.rank_of(stage + 1) == self.me:
            self.inputs[(stage + 1, mb)] = out.detach().requires_grad_()
        else:
            self.outbox[(Kind.SEND_F, stage, mb)] = out.detach()
        if not self.training:
            return
        self.outputs[key] = out
        self.inflight += 1 / (self.layout.chunks * self.slices)
        self.peak_inflight = max(self.peak_inflight, self.inflight)

    def _module(self, key: Key) -> nn.Module:
        """The module that runs this forward: the stage itself (2BW: the weight version of its batch)."""
        return self.stages[key[0]]

    def _backward(self, key: Key, split: bool) -> None:
        stage, mb = key
        out = self.outputs.pop(key)
        outputs: list[torch.Tensor] = [out]
        grads: list[torch.Tensor | None] = [None if stage == self.last else self.grads.pop(key)]
        if self.sliced:  # this slice's keys and values, with what the later slices' backwards gave them
            kv = self.kv[(stage, mb // self.slices)]
            made, kv_grads = kv.pop_slice()
            outputs.extend(made)
            grads.extend(kv_grads)
            if mb % self.slices == 0:  # the sequence's first slice: nothing of it is needed any more
                del self.kv[(stage, mb // self.slices)]
        self.queue.target = self.deferred[key] if split else None
        try:
            _backward(outputs, grads)
        finally:
            self.queue.target = None
        self.inflight -= 1 / (self.layout.chunks * self.slices)
        if stage == 0:
            return
        grad_in = self.inputs.pop(key).grad
        if grad_in is None:
            raise RuntimeError(f"stage {stage} microbatch {mb}: backward left the stage's input without a gradient")
        if self.layout.rank_of(stage - 1) == self.me:
            self.grads[(stage - 1, mb)] = grad_in
        else:
            self.outbox[(Kind.SEND_B, stage, mb)] = grad_in


@dataclass
class TwoBWExecutor(PipelineExecutor):
    """PipeDream-2BW over the same machinery: no flush, two weight versions per stage, delay one.

    Step k runs `schedules.two_bw_window`: batch k's forwards, and the backwards of batch k-1's last
    microbatches beside batch k's first. Batch k runs on a copy of the weights as they are when step k
    begins, W(k-1) (the first two batches both on W(0)), kept in version slot k % 2 until its last
    backward here, so the optimizer may change the stage's own weights while microbatches are in
    flight. Each slot accumulates its batch's gradient; at the end of step k (k >= 1) batch k-1's
    is complete on every rank and becomes the engine's gradient, so the trainer's optimizer makes
    W(k) = W(k-1) - lr * grad f(W(k-2)): 2BW's W(t+1) = W(t) - lr * grad f(W(t-1)). Step 0 has no
    gradient to apply (`gradient_ready`); the last step drains, its batch's gradient unused (it would
    make a version no batch runs on). The stage modules hold the master weights the optimizer steps,
    and evaluation runs on them.
    """

    windows: dict[tuple[bool, bool], list[Action]] = field(default_factory=dict)
    """This rank's window by (first, last) step (schedules.two_bw_window)."""
    microbatches: int = 1
    total_steps: int = 1
    versions: dict[int, tuple[nn.Module, nn.Module]] = field(default_factory=dict)
    """Per stage, the two weight-version copies (built from the stage in __post_init__)."""
    step_index: int = 0
    previous: list[Batch] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.window_steps = {key: group_steps(acts) for key, acts in self.windows.items()}
        self.versions = {s: (_version_copy(mod), _version_copy(mod)) for s, mod in self.stages.items()}
        self.inflight = 0.0
        self._clear()

    def run(self, batches: list[Batch]) -> torch.Tensor:
        if self.engine is not None:
            self.engine.set_sync(False)
        k, m = self.step_index, self.microbatches
        if k >= self.total_steps:
            raise RuntimeError(f"2bw was built for {self.total_steps} steps; step {k + 1} has no window")
        self._rekey(m)
        for stage, pair in self.versions.items():  # batch k's forwards run on the weights as they are now
            _copy_weights(self.stages[stage], pair[k % 2])
        current = [self.prepare(with_positions(b, self.device)) for b in batches]
        # ids 0..m-1 are the previous batch (step 0 has none and never names them)
        self.batches = (self.previous if k else current) + current
        self.trace, self.peak_inflight = [], self.inflight
        window = (k == 0, k == self.total_steps - 1)
        self._walk(self.windows[window], self.window_steps[window], training=True)
        if k > 0:  # batch k-1's last backward ran on every rank: its gradient is the engine's
            for stage, pair in self.versions.items():
                _hand_gradient(pair[(k - 1) % 2], self.stages[stage])
        if window[1] and self.in_flight():
            raise RuntimeError("2bw's last step left microbatches in flight")
        self.previous, self.step_index = self.batches[m:], k + 1
        return self.loss_sum

    def _rekey(self, m: int) -> None:
        """Last step's batch (ids m..2m-1) becomes this step's previous one (ids 0..m-1)."""
        if any(mb < m for _, mb in [*self.inputs, *self.outputs, *self.grads]):
            raise RuntimeError("2bw: a microbatch of two steps ago is still in flight")
        self.inputs = {(s, mb - m): t for (s, mb), t in self.inputs.items()}
        self.outputs = {(s, mb - m): t for (s, mb), t in self.outputs.items()}
        self.grads = {(s, mb - m): t for (s, mb), t in self.grads.items()}

    def _module(self, key: Key) -> nn.Module:
        # a training step's forwards are all its own batch's (ids m..2m-1): version slot k % 2
        return self.versions[key[0]][self.step_index % 2] if self.training else self.stages[key[0]]

    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        """Forward only on the master weights, the microbatches in flight set aside meanwhile."""
        state = (self.inputs, self.outputs, self.grads, self.outbox, self.deferred, self.batches)
        try:
            return super().evaluate(batches)
        finally:
            self.inputs, self.outputs, self.grads, self.outbox, self.deferred, self.batches = state

    def gradient_ready(self) -> bool:
        return self.step_index > 1

    def metrics(self) -> dict[str, float]:
        held = sum(
            p.numel() * p.element_size() for pair in self.versions.values() for v in pair for p in v.parameters()
        )
        return {**super().metrics(), "pp_weight_versions_bytes": float(held)}


def _version_copy(stage: nn.Module) -> nn.Module:
    """A stage's copy for one weight version: its own parameters. A parameter's deepcopy carries
    neither its gradient nor its hooks, so the engine's bucket views and DDP's hooks stay the master's."""
    return deepcopy(stage)


@torch.no_grad()
def _copy_weights(src: nn.Module, dst: nn.Module) -> None:
    for a, b in zip(src.parameters(), dst.parameters(), strict=True):
        b.copy_(a)
        b.grad = None


@torch.no_grad()
def _hand_gradient(version: nn.Module, stage: nn.Module) -> None:
    """A version's accumulated gradient into the stage's (the engine's buffers); the version's freed."""
    for v, p in zip(version.parameters(), stage.parameters(), strict=True):
        if p.grad is None:
            raise RuntimeError("2bw hands gradients to the engine's buffers: the stage parameter has none")
        if v.grad is None:
            p.grad.zero_()
        else:
            p.grad.copy_(v.grad)
        v.grad = None
