"""Tooling around the runtime: it analyses what the runtime runs, and the runtime never imports it.

- schedule_check.py  a pipeline schedule is complete, ordered and deadlock-free (config validation
                     runs it on a custom CSV schedule before any process starts)
- simulator.py       a schedule's timeline, bubble and activation memory; the papers' closed forms
- trace.py           a real run's pipeline trace read back into the simulator's terms
- plot.py            Gantt charts of simulated or traced timelines
- schedule_cli.py    `meshtrain schedule`
- tp_measure.py      what a tensor-parallel block sends and saves, in theory and measured
- tp_diagram.py      the tensor-parallel block diagram in docs/img
- cp_diagram.py      which rank computes which attention block at which ring step (docs/img)
- diloco_diagram.py  DiLoCo's outer syncs over the inner steps, plain, streaming and overlapped (docs/img)
- terapipe_diagram.py  TeraPipe's token slices against 1F1B and GPipe at one long sequence (docs/img)
- moe_plot.py        expert load over steps, a heat map per MoE layer, from a run's metrics
- metrics_plot.py    `meshtrain plot`: a run's loss, throughput, memory and traffic as PNGs
- tokenizer_cli.py   `meshtrain tokenizer train`: a byte-level BPE tokenizer.json from a corpus
- prepare_data.py    `meshtrain prepare-data`: a corpus tokenized into memory-mapped token shards
- bench_comm.py      `meshtrain bench-comm`: time, algbw and busbw of each collective, nccl-tests style
- bench_comm_mpi.py  `bench-comm --backend mpi`: the same collectives over mpi4py on mpich, one mpiexec rank each
- calibrate.py       `bench-comm --calibrate`: alpha-beta fits and the matmul peak as a planner cluster TOML
- scaling.py         `meshtrain scaling`: a measured IsoFLOP grid, its L(N, D) fit beside the published ones
- lighthouse.py      `meshtrain lighthouse`: the store at which separately launched DiLoCo islands meet
"""
