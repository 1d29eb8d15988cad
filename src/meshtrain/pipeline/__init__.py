"""Pipeline parallelism: schedules as per-rank action lists, stages cut from the single-device model,
and one executor that runs any rank's list over point-to-point sends.

- schedules.py  the data model, the execution contract, the built-in schedules (gpipe, 1f1b,
                interleaved-1f1b, zb-h1, zb-h2, zb-v on the V placement, and terapipe over token
                slices), PipeDream-2BW's per-step windows, the forward-only one evaluation runs,
                send/recv placement and CSV input/output
- stage.py      how blocks are split into stages, and building one stage on the meta device
- executor.py   runs a rank's actions (the pipelined StepRunner), with the B/W split for W actions;
                evaluation's forward-only list on the same machinery; 2BW's executor, which keeps
                microbatches and two weight versions in flight across steps
- comm.py       the counted point-to-point exchange

The same action lists feed the checker, the simulator, the plots and the trace comparison, which
live in meshtrain.tools (schedule_check, simulator, plot, trace, schedule_cli).
"""
