"""Single-device model definitions. Parallelism is applied from outside (see meshtrain.parallelize)."""

from meshtrain.model.llama import Llama, build_model, count_params

__all__ = ["Llama", "build_model", "count_params"]
