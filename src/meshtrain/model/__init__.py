"""Single-device model definitions. Parallelism is applied from outside (see meshtrain.build).

- llama.py     the Llama-style decoder, written for one device
- moe.py       its mixture-of-experts feed-forward (router, experts, balancing, capacity)
- math.py      its arithmetic (parameters, FLOPs), torch-free, shared by the trainer and the planner
- kv_cache.py  the keys and values generation caches between tokens
- int8.py      LLM.int8() inference: its linear layers swapped for int8 ones (`meshtrain eval/generate --quantize`)

The model is imported on first use: the CLI reaches math.py (through the planner) while validating
a config, before any worker starts, and importing torch would delay every one-line error by seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshtrain.model.llama import Llama, build_model, count_params

__all__ = ["Llama", "build_model", "count_params"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from meshtrain.model import llama

        return getattr(llama, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
