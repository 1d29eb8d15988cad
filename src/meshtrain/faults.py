"""Failure injection for tests of crash safety, elastic restart and hang diagnosis (the only fake in
the codebase: it injects a failure, and nothing else).

MESHTRAIN_FAULT="<point>:<step>[@<rank>]" fires at that point of that step, on every rank of the
first attempt or only on global rank <rank>:
  after_step:N      exit abruptly right after optimizer step N (and its checkpoint, if one was due)
  in_save:N         exit abruptly inside the save of step N, after the shard files are written but
                    before the commit
  enospc_in_save:N  raise the error a full disk raises (ENOSPC) inside the save of step N
  sleep:N           sleep for an hour before step N: a rank stuck in compute, for the hang watchdog
  nan_grad:N        make this rank's gradients of step N NaN (the trainer scales its loss by NaN), as an
                    overflow would; the reduction spreads them to every rank
Restarted attempts (TORCHELASTIC_RESTART_COUNT > 0) never fail, so a restart can show recovery.
"""

from __future__ import annotations

import errno
import os
import sys
import time


def fault_requested(point: str, step: int) -> bool:
    """Whether MESHTRAIN_FAULT asks for `point` at `step` on this rank (for injections done by the caller)."""
    spec = os.environ.get("MESHTRAIN_FAULT", "")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        return False
    spec, _, rank = spec.partition("@")
    want_point, _, want_step = spec.partition(":")
    if rank and rank != os.environ.get("RANK", "0"):
        return False
    return want_point == point and want_step.isdigit() and int(want_step) == step


def maybe_fail(point: str, step: int) -> None:
    if not fault_requested(point, step):
        return
    print(f"injected fault {point} at step {step} on rank {os.environ.get('RANK', '0')}", file=sys.stderr, flush=True)
    if point == "sleep":
        time.sleep(3600)
    elif point == "enospc_in_save":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:
        os._exit(17)
