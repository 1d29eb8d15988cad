"""Pipeline parallelism: schedules as data, a symbolic simulator, Gantt plots and the `schedule` CLI.

Nothing here starts processes or touches torch.distributed; the executor that runs a schedule over
real ranks follows the execution contract documented in `meshtrain.pipeline.schedules`.
"""
