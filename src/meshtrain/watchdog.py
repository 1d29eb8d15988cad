"""Hangs name their rank and collective: a watchdog thread on every rank.

Gloo's own timeout names no rank ("Timed out waiting ... for recv"), and NCCL's flight recorder needs
offline analysis; this watchdog reports from inside the run. Every `heartbeat_s` each rank publishes
its collective log (meshtrain.core.comm: calls issued per group, the last few, the one it is blocked
in) to the rendezvous store. When a rank has been blocked in one collective for longer than
`timeout_s`, its watchdog claims the report through the store (one reporter per job), asks every
rank for its Python stack (each rank's watchdog thread answers with faulthandler's dump of all its
threads: it runs even while the main thread sleeps or waits), and prints one report:

- the collective the reporter waits in;
- which ranks are behind: the members of that collective's group that have not issued it yet;
- every rank's state: the collective it is in, or that it is in none (stuck in compute or data
  loading), with its step and its last calls;
- every rank's stack.

The report also goes to RUN_DIR/hang_report.txt. Then the reporting process exits with code 3, so
the elastic agent stops the job (and restarts it when --max-restarts allows).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from meshtrain.accounting import CollectiveLog

EXIT_CODE = 3
STACK_WAIT_S = 5.0  # how long the reporter waits for the other ranks' stacks


class Watchdog:
    def __init__(
        self,
        log: CollectiveLog,
        store: dist.Store,
        rank: int,
        world: int,
        timeout_s: float,
        heartbeat_s: float,
        run_dir: Path,
    ) -> None:
        self.log, self.store, self.rank, self.world = log, store, rank, world
        self.timeout_s, self.heartbeat_s, self.run_dir = timeout_s, heartbeat_s, run_dir
        self._stop = threading.Event()
        self._answered = False
        self._thread = threading.Thread(target=self._loop, name="meshtrain-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.heartbeat_s + 1)

    # ---- the thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._beat()
            except Exception as exc:  # a dead store (the job is being torn down) must not kill the rank
                print(f"meshtrain watchdog on rank {self.rank} stopped: {exc}", file=sys.stderr, flush=True)
                return

    def _beat(self) -> None:
        self.store.set(f"state{self.rank}", json.dumps(self.log.snapshot()))
        if not self._answered and self.store.check(["dump"]):
            self._answer()
        waiting = self.log.waiting
        if waiting is not None and time.monotonic() - waiting[1] > self.timeout_s:
            self._report()

    def _answer(self) -> None:
        """Publish this process's stacks (all threads), as faulthandler prints them."""
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(f, all_threads=True)
            f.seek(0)
            self.store.set(f"stack{self.rank}", f.read())
        self._answered = True

    def _report(self) -> None:
        if self.store.add("reporter", 1) != 1:
            return  # another rank reports; the agent will stop this one
        self.store.set("dump", "1")
        self._answer()
        self.store.set(f"state{self.rank}", json.dumps(self.log.snapshot()))
        deadline = time.monotonic() + STACK_WAIT_S
        keys = [f"stack{r}" for r in range(self.world)]
        while time.monotonic() < deadline and not self.store.check(keys):
            time.sleep(0.1)
        time.sleep(self.heartbeat_s)  # one more heartbeat: every rank's latest state
        text = render(self.rank, self._read("state"), self._read("stack"))
        print(text, file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):  # the report is on stderr already
            (self.run_dir / "hang_report.txt").write_text(text)
        os._exit(EXIT_CODE)

    def _read(self, prefix: str) -> dict[int, str]:
        out = {}
        for r in range(self.world):
            if self.store.check([f"{prefix}{r}"]):
                out[r] = self.store.get(f"{prefix}{r}").decode()
        return out


def _members(group: str) -> list[int]:
    found = re.search(r"\[([\d, ]*)\]", group)
    return [int(x) for x in found.group(1).split(",") if x.strip()] if found else []


def render(reporter: int, raw_states: dict[int, str], stacks: dict[int, str]) -> str:
    """The report, from every rank's published state and stack (pure: the tests call it too)."""
    states: dict[int, dict[str, Any]] = {r: json.loads(s) for r, s in raw_states.items()}
    mine = states[reporter]["waiting"]
    lines = [f"meshtrain watchdog: rank {reporter} has waited {mine['for_s']:.1f} s in {mine['entry']}"]
    members = _members(mine["group"]) or sorted(states)
    behind = [r for r in members if r in states and states[r]["counts"].get(mine["group"], 0) < mine["seq"]]
    missing = [r for r in members if r not in states]
    for r in behind:
        state = states[r]
        where = (
            f"waits in {state['waiting']['entry']}"
            if state["waiting"]
            else f"is in no collective ({state['activity']}: stuck in compute or data loading)"
        )
        lines.append(
            f"behind: rank {r}, which issued {state['counts'].get(mine['group'], 0)} calls on "
            f"{mine['group']} and {where}"
        )
    lines += [f"behind: rank {r}, which published no state (not started, or dead)" for r in missing]
    if not behind and not missing:
        lines.append(f"behind: none in {mine['group']}: every member issued it (a mismatched collective?)")
    lines.append("ranks:")
    for r in sorted(states):
        s = states[r]
        now = (
            f"waiting {s['waiting']['for_s']:.1f} s in {s['waiting']['entry']}"
            if s["waiting"]
            else f"in no collective ({s['activity']})"
        )
        last = s["recent"][-1] if s["recent"] else "none yet"
        lines.append(f"  rank {r} | step {s['step']} | {now} | last call: {last}")
    lines.append("stacks (faulthandler):")
    for r in sorted(stacks):
        lines.append(f"--- rank {r} ---")
        lines.append(stacks[r].rstrip())
    return "\n".join(lines) + "\n"
