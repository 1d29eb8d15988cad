"""meshtrain's planner: memory, communication and step-time predictions for parallel layouts.

The public entry points are re-exported here; docs/planner.md describes the model behind them.
contention.py corrects a step's time for ranks that share CPU cores (docs/planner.md, "Fidelity").
"""

from meshtrain.model.math import flops_per_token
from meshtrain.planner.cli import add_parser, run
from meshtrain.planner.predict import predict_run, predict_step_time

__all__ = ["add_parser", "flops_per_token", "predict_run", "predict_step_time", "run"]
