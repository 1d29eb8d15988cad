"""Compressed communication strategies built on core.quantize's codecs.

- comm.py         1-bit Adam's compressed all-reduce (sign compression, two-stage error feedback)
- onebit_adam.py  the 1-bit Adam optimizer and the engine decorator that keeps gradients local after the freeze

Nothing is imported here, so that the compressed all-reduce loads without the engine contract
(which pulls in torch.distributed.checkpoint): import the modules themselves.
"""
