"""The planner's user-facing error type."""

from __future__ import annotations

from meshtrain.config import ConfigError


class PlanError(ConfigError):
    """Bad planner input. Subclassing ConfigError lets one `except` in the CLI report both kinds
    as the same single `error: ...` line."""
