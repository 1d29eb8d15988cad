"""Failure injection for tests of crash safety and elastic restart (the only fake in the codebase).

MESHTRAIN_FAULT="<point>:<step>" makes every rank of the first attempt exit abruptly at that point:
  after_step:N  - right after optimizer step N (and its checkpoint, if one was due)
  in_save:N     - inside the save of step N, after the shard files are written but before the rename
Restarted attempts (TORCHELASTIC_RESTART_COUNT > 0) never fail, so a restart can show recovery.
"""

from __future__ import annotations

import os
import sys


def maybe_fail(point: str, step: int) -> None:
    spec = os.environ.get("MESHTRAIN_FAULT", "")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        return
    want_point, _, want_step = spec.partition(":")
    if want_point == point and want_step.isdigit() and int(want_step) == step:
        print(f"injected fault {point} at step {step}", file=sys.stderr, flush=True)
        os._exit(17)
