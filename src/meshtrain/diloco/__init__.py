"""DiLoCo: islands that train apart and meet every few hundred steps (Douillard et al. 2023), with
Streaming DiLoCo's fragments, the overlapped (delay-1) outer step and quantized pseudo-gradients.

- comm.py   the cross-island mean of the pseudo-gradients: fp32, bf16 or int8 codes
- outer.py  the outer loop: fragments, host copies of the global parameters and the outer momentum,
            Nesterov SGD, the delay-1 variant; the step hook the build path hands the trainer
- membership.py  join mode (diloco.join): each island its own launch; a quorum per sync through
            `meshtrain lighthouse`'s store, islands dropped on timeout or death and rejoining with
            a live member's outer state

Islands are the outermost mesh axis (parallel.diloco, meshtrain.degrees): each is a complete layout
of its own, and nothing but the outer step crosses between them. docs/diloco.md explains the rest.
"""

from meshtrain.diloco.membership import ElasticIslands
from meshtrain.diloco.outer import DiLoCo, FixedIslands, OuterGroup, OuterSettings, fragment_of

__all__ = ["DiLoCo", "ElasticIslands", "FixedIslands", "OuterGroup", "OuterSettings", "fragment_of"]
