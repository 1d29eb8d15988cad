"""The parallel core: what the strategies and the build path share, and nothing strategy-specific.

- engine.py        the GradEngine contract between the trainer and a gradient strategy, and the
                   decorators other parallelisms use to change part of it
- runner.py        the StepRunner contract (one optimizer step's passes), the plain micro-step loop,
                   micro-batches and how losses are summed across ranks
- weight_grads.py  the B/W backward split that zero-bubble schedules and tensor-parallel layers share
- parts.py         a rank's model parts and their gradient buckets, shared by plain DP and ZeRO-1/2
- comm.py          the one communication layer: every collective counted, logged for the hang
                   watchdog, and marked while the rank blocks in it
- quantize.py      compression for communication: block-wise int8 / int4, 1-bit signs with
                   per-block scales, error feedback (ZeRO++ and 1-bit Adam build on it)

Strategy packages (data_parallel, zero, tensor_parallel, pipeline, ...) import from here and from
the other neutral modules (config, topology, accounting, model, loss), never from each other:
tests/test_architecture.py enforces it.
"""
