"""safetensors in and out: Hugging Face weights loaded into any layout, and written for transformers.

Names: a dense model's are LlamaForCausalLM's already. A mixture-of-experts model travels in
Mixtral's on-disk layout (what transformers writes and reads for MixtralForCausalLM): the router
`block_sparse_moe.gate`, expert j's gate/down/up projections `block_sparse_moe.experts.j.w1/w2/w3`.

Loading goes through torch.distributed.checkpoint with its Hugging Face reader, the same collective
load a resume does, so every layout reads what it holds: a pipeline stage its blocks, an
expert-parallel rank its experts, a tensor-parallel rank the rows or columns of its shards
(DTensors: DCP reads those slices of the files). ZeRO's view would gather whole tensors for DCP to
fill, a full copy of the model on every rank; it loads by name instead (`LoadsByName`): each tensor
is read alone from its file and each rank copies the pieces of its own shards, so a rank holds one
full tensor at a time, never the model. (Under TP over ZeRO the DCP path remains.)

Writing: one model.safetensors, or above `max_shard_bytes` numbered shards with the index file
(model.safetensors.index.json: total size and the file of every tensor) that transformers reads.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from meshtrain.config import ModelConfig
from meshtrain.hf.config import read_hf_config
from meshtrain.hf.files import INDEX, SINGLE, tensor_files, to_hf_name
from meshtrain.model import Llama, build_model


def load_hf_weights(view: dict[str, torch.Tensor] | Stateful, directory: Path) -> None:
    """Overwrite the weights of a checkpoint view (GradEngine.model_state_dict(): tensors, or ZeRO's
    Stateful) with DIR's. Collective when a process group exists: every rank calls it."""
    if isinstance(view, LoadsByName):  # ZeRO: each rank fills its shards, one full tensor at a time
        view.load_by_name(_reader(directory))
        return
    tensors = view.state_dict() if isinstance(view, Stateful) else view
    renamed = {to_hf_name(name): t for name, t in tensors.items()}
    with warnings.catch_warnings(), torch.no_grad():
        # DCP warns that it loads without a process group: what one process importing a model wants
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(renamed, storage_reader=dcp.HuggingFaceStorageReader(str(directory)))
    if isinstance(view, Stateful):
        view.load_state_dict({name: renamed[to_hf_name(name)] for name in tensors})


@runtime_checkable
class LoadsByName(Protocol):
    """A checkpoint view that loads from full tensors fetched by name (meshtrain.zero.base.ModelState)."""

    def load_by_name(self, fetch: Callable[[str], torch.Tensor]) -> None: ...


def _reader(directory: Path) -> Callable[[str], torch.Tensor]:
    """name -> that tensor of DIR's safetensors, in fp32, read alone (safetensors maps the file)."""
    from safetensors import safe_open

    where = tensor_files(directory)

    def fetch(name: str) -> torch.Tensor:
        with safe_open(str(where[to_hf_name(name)]), framework="pt") as f:
            return f.get_tensor(to_hf_name(name)).float()

    return fetch


def load_hf_model(directory: Path, device: str = "cpu") -> Llama:
    """DIR as one device's model (what the parity tests and `meshtrain generate` start from)."""
    model = build_model(ModelConfig(**read_hf_config(directory)), device)
    load_hf_weights(dict(model.named_parameters()), directory)
    return model


def shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names in files of at most max_bytes each (a bigger tensor gets a file of its own), in order."""
    out: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if out[-1] and used + size > max_bytes:
            out.append([])
            used = 0
        out[-1].append(name)
        used += size
    return out


def save_hf_weights(state: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, max_shard_bytes: int) -> list[str]:
    """Write `state` (our names) as safetensors in `out`; returns the files written."""
    from safetensors.torch import save_file

    tensors = {to_hf_name(n): t.detach().to(dtype).contiguous() for n, t in state.items()}
    groups = shards({n: t.numel() * t.element_size() for n, t in tensors.items()}, max_shard_bytes)
    if len(groups) == 1:
        save_file(tensors, str(out / SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, names in zip(files, groups):
        save_file({n: tensors[n] for n in names}, str(out / file), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {n: file for file, names in zip(files, groups) for n in names},
    }
    (out / INDEX).write_text(json.dumps(index, indent=2))
    return [*files, INDEX]
