"""meshtrain's planner: memory, communication and step-time predictions for parallel layouts.

The public entry points are re-exported here; docs/planner.md describes the model behind them.
"""

from meshtrain.model.math import flops_per_token
from meshtrain.planner.cli import add_parser, run
from meshtrain.planner.predict import predict_run

__all__ = ["add_parser", "flops_per_token", "predict_run", "run"]
