"""LLM.int8() inference: nn.Linear layers swapped for int8 ones, outlier input features in fp32.

`quantize_model(model, "int8")` replaces the model's linear layers (child modules, via setattr on
their parents) by `Int8Linear`s that hold the weight as int8, one scale per output channel. Each
forward (Dettmers et al. 2022, "LLM.int8()"; bitsandbytes' Linear8bitLt computes the same):

    x (rows, K)                                 W (N, K): int8 Wq, scale sw = absmax(W[n, :]) / 127
      |
      +-- columns with any |x| >= threshold ------> x[:, outliers] @ (Wq[:, outliers] * sw).T   fp32
      |                                                                                  |
      +-- the other columns (outliers zeroed)                                            |
            xq = round(x / sx), sx = absmax(x[r, :]) / 127  (per row)                    |
            C = xq @ Wq.T in int32      torch._int_mm, or a float matmul of the int8     |
            C * sx[:, None] * sw[None, :] -------------------------------------------> (+) -> y

A few hidden features of a large trained transformer carry values far larger than the rest; one
of them in a row sets that row's scale, and the row's ordinary values round to a handful of levels.
Taking the outlier columns out of the int8 product (they are few) keeps the rest finely quantized.
`mode="absmax"` is the same linear with threshold 0: no outlier columns, plain per-row x per-channel
absmax int8, the baseline LLM.int8 is measured against.

The outlier product uses the dequantized weight columns, as bitsandbytes does: the outlier columns
are found per input, so keeping exact weights for them would mean keeping the whole fp32 weight
beside the int8 one (more memory than the unquantized model). The weight's own rounding is per
output channel and small; the activations' outliers are what plain int8 cannot absorb. The price
shows where an outlier feature meets small weights: a feature scaled up 60x and the weights that
read it scaled down 60x (the same fp32 function) leave LLM.int8's logits 2.5% off, against 0.4%
with exact weight columns and 6.4% for plain absmax (tests/test_int8.py, docs/compression.md).

Left in floating point (named in the report): the lm_head, as Hugging Face's llm_int8_skip_modules
does by default (the logits are sensitive to it and, under tied embeddings, it is the embedding's
weight), embeddings and norms (not matmuls), and the routed experts of a MoE layer (their grouped
matmul reads the experts' weights directly; shared experts are ordinary linears and are quantized).

The int8 product runs through torch._int_mm where it accepts the operands (CPU: any 2-D int8
pair we tried; CUDA: rows > 16, K and N multiples of 8), else through a float matmul of the int8
values: exact in fp32 while K x 127^2 < 2^24 (K <= 1040), in float64 beyond. Each layer counts the
path its matmuls took (`matmul_paths`), so a caller can say which one ran. By default
(`int_mm=None`) torch._int_mm is taken on CUDA and on CPUs with AVX-512 (bitsandbytes' own rule on
the CPU), the float path elsewhere: without AVX-512 torch._int_mm is correct but slow (torch 2.13 on
the AVX2 development machine, one thread: the default model's forward of 4 x 128 tokens took 978 ms,
against 82 ms through the float matmul and 35 ms in fp32), with the same result either way.
Inference only: no gradients.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from meshtrain.config import ConfigError
from meshtrain.core.quantize import quantize

MODES: tuple[str, ...] = ("int8", "absmax")
DEFAULT_THRESHOLD = 6.0
SKIP = ("lm_head",)
"""Linear layers kept in floating point by default (module docstring)."""
INT_MM, FLOAT_MM = "torch._int_mm", "float matmul of the int8 values"
_EXACT_FP32_K = 2**24 // 127**2  # the longest dot product of int8 values that fp32 sums exactly


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scales): each row of a 2-D tensor by its absmax, x ~ q * scale[:, None].

    The block codec of meshtrain.core.quantize with one block per row: a zero row gets scale 0."""
    rows, width = x.shape
    if rows == 0:
        return torch.zeros_like(x, dtype=torch.int8), torch.zeros(0, device=x.device)
    packed = quantize(x, 8, block=width)
    return packed.data.view(rows, width), packed.scales


def fast_int_mm(device: torch.device) -> bool:
    """Is torch._int_mm the faster path here? CUDA, or a CPU with AVX-512 (module docstring)."""
    return device.type == "cuda" or (
        device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    )


def int8_matmul(a: torch.Tensor, b: torch.Tensor, int_mm: bool = True) -> tuple[torch.Tensor, str]:
    """(a @ b.T as int32-exact values, the path taken) for int8 a (m, k) and b (n, k); int_mm=False
    takes the float path even where torch._int_mm would run (module docstring: it can be slower)."""
    if int_mm:
        try:
            return torch._int_mm(a, b.t()), INT_MM
        except RuntimeError:  # a device or shape _int_mm does not take (module docstring)
            pass
    exact = torch.float32 if a.shape[1] <= _EXACT_FP32_K else torch.float64
    return a.to(exact) @ b.to(exact).t(), FLOAT_MM


class Int8Linear(nn.Module):
    """y = x W.T (+ b) with W in int8 per output channel and x in int8 per row, outlier columns of x
    (any |x| >= threshold) computed in fp32 instead; threshold 0 = plain absmax int8."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float, int_mm: bool = True) -> None:
        super().__init__()
        if not threshold >= 0:
            raise ConfigError(f"the outlier threshold {threshold} must be >= 0 (0 = plain absmax int8)")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.threshold, self.int_mm = threshold, int_mm
        q, scale = quantize_rows(weight.detach().float())
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.paths: Counter[str] = Counter()
        """How many forwards took each matmul path (INT_MM or FLOAT_MM)."""
        self.outlier_calls = 0
        """Forwards that had at least one outlier column (computed in fp32)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD, int_mm: bool = True) -> Int8Linear:
        return cls(linear.weight, linear.bias, threshold, int_mm)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, self.in_features).float()
        outliers = torch.zeros(0, dtype=torch.long, device=a.device)
        if self.threshold > 0:
            outliers = (a.abs() >= self.threshold).any(0).nonzero().flatten()
        regular = a.index_fill(1, outliers, 0.0) if outliers.numel() else a
        aq, a_scale = quantize_rows(regular)
        c, path = int8_matmul(aq, self.weight_int8, self.int_mm)
        self.paths[path] += 1
        y = c.float() * a_scale[:, None] * self.weight_scale[None, :]
        if outliers.numel():
            self.outlier_calls += 1
            w = self.weight_int8.index_select(1, outliers).float() * self.weight_scale[:, None]
            y += a.index_select(1, outliers) @ w.t()
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"


@dataclass(frozen=True)
class QuantizeReport:
    """What quantize_model converted, what it left in floating point, and the weights' bytes."""

    mode: str
    threshold: float
    converted: list[str]
    kept: list[str] = field(default_factory=list)
    """Linear layers left in floating point (SKIP, routed experts)."""
    fp32_bytes: int = 0
    """The unquantized model's weights in fp32 (a tied weight once)."""
    bf16_bytes: int = 0
    """... in bf16."""
    quantized_bytes: int = 0
    """The quantized model's weights as it holds them: int8 values and fp32 scales for the converted
    layers, fp32 for everything else."""


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers (each tensor once, however shared)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.state_dict(keep_vars=True).values()]:
        if t is not None:
            seen.setdefault(id(t), t.numel() * t.element_size())
    return sum(seen.values())


def _keeps(name: str, skip: tuple[str, ...]) -> bool:
    """Leave the linear `name` in floating point? (module docstring: lm_head, routed experts)"""
    return name.split(".")[-1] in skip or ".experts." in f".{name}"


def quantize_model(
    model: nn.Module,
    mode: str = "int8",
    threshold: float = DEFAULT_THRESHOLD,
    skip: tuple[str, ...] = SKIP,
    int_mm: bool | None = None,
) -> QuantizeReport:
    """Replace, in place, every nn.Linear of `model` but those in `skip` and the routed experts by an
    Int8Linear (mode "int8": LLM.int8 with `threshold`; "absmax": threshold 0). Copy the model
    first (copy.deepcopy) to keep the floating-point one. `int_mm`: take torch._int_mm where it runs
    (None: where it is the faster path, `fast_int_mm`)."""
    if mode not in MODES:
        raise ConfigError(f"quantization mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "int8" and not threshold > 0:
        raise ConfigError(f"LLM.int8's outlier threshold {threshold} must be > 0 (mode 'absmax' has none)")
    fp32 = sum(p.numel() for p in model.parameters()) * 4  # parameters() yields a tied weight once
    level = threshold if mode == "int8" else 0.0
    if int_mm is None:
        int_mm = fast_int_mm(next(model.parameters()).device)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    converted, kept = [], []
    for name, linear in linears:
        if _keeps(name, skip):
            kept.append(name)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8Linear.from_linear(linear, level, int_mm))
        converted.append(name)
    return QuantizeReport(mode, level, converted, kept, fp32, fp32 // 2, weight_bytes(model))


def apply_quantize(model: nn.Module, option: str) -> QuantizeReport | None:
    """The CLI's --quantize on a loaded model: none (the report None), int8 or absmax."""
    return None if option == "none" else quantize_model(model, option)


def matmul_paths(model: nn.Module) -> dict[str, int]:
    """Forwards per matmul path, summed over the model's Int8Linear layers."""
    total: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total.update(m.paths)
    return dict(total)


def describe(report: QuantizeReport, model: nn.Module) -> str:
    """One line for the CLI, after the forwards: the mode, the matmul path that ran, how often
    outlier columns were taken out, and the weights' size three ways."""
    paths = matmul_paths(model)
    ran = ", ".join(f"{p} ({n} calls)" for p, n in sorted(paths.items())) or "no int8 matmul yet"
    label = f"LLM.int8 (threshold {report.threshold:g})" if report.mode == "int8" else "absmax int8"
    kept = f"{len(report.kept)} kept ({', '.join(report.kept) or '-'})"
    outliers = ""
    if report.mode == "int8":
        calls = sum(m.outlier_calls for m in model.modules() if isinstance(m, Int8Linear))
        outliers = f" | outlier columns in fp32 in {calls} of {sum(paths.values())} calls"
    mib = 2**20
    return (
        f"{label}: {len(report.converted)} linears int8, {kept}{outliers} | matmul: {ran} "
        f"| weights {report.fp32_bytes / mib:.2f} MiB fp32, {report.bf16_bytes / mib:.2f} MiB bf16, "
        f"{report.quantized_bytes / mib:.2f} MiB int8 model"
    )
