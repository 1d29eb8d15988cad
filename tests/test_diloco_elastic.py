"""DiLoCo islands that leave and rejoin (diloco.join, meshtrain.diloco.membership), end to end: a
lighthouse, two islands launched separately, a real SIGKILL of one island's worker at a random
inner step, torchrun's restart, the rejoin with a live island's outer state, and identical final
parameters on both islands. The quorum's decisions are tested pure. The survivor is held (SIGSTOP)
between dropping the killed island and the restarted one's registration, so the run cannot end
before the restart on a loaded machine; it is never restarted itself.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import ROOT, TINY
from meshtrain.diloco.membership import Sync, divisor, gathered, propose
from meshtrain.launch import free_port

TIMEOUT_S = 10  # generous: on a loaded machine two islands' steps drift apart by seconds
STEPS = 10
KILL_AFTER = random.Random(14).choice([3, 5])  # odd: the next step is a sync, which island 0 reaches first


@dataclass
class Island:
    run_dir: Path
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text()

    def records(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _env(root: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for var, sub in (("TMPDIR", "tmp"), ("TORCHINDUCTOR_CACHE_DIR", "ind"), ("TORCH_EXTENSIONS_DIR", "ext")):
        (root / sub).mkdir(exist_ok=True)
        env[var] = str(root / sub)
    env["MPLCONFIGDIR"] = str(root / "tmp")
    return env


def _lighthouse(root: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "meshtrain", "lighthouse", "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=_env(root),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # it says where it listens once the store is up
    assert f"127.0.0.1:{port}" in line, line
    return proc, port


def _island(root: Path, i: int, port: int) -> Island:
    run_dir, log = root / f"island{i}", root / f"island{i}.log"
    sets = [
        "parallel.diloco=2",
        f"diloco.join=127.0.0.1:{port}",
        f"diloco.island={i}",
        "diloco.inner_steps=2",
        f"diloco.timeout_s={TIMEOUT_S}",
        f"training.steps={STEPS}",
        f"checkpoint.interval={STEPS}",
        "logging.log_interval=1",
    ]
    args = ["train", "--config", str(TINY), "--nproc", "1", "--max-restarts", "1", "--run-dir", str(run_dir)]
    for item in sets:
        args += ["--set", item]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshtrain", *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(root)
        )
    return Island(run_dir, proc, log)


def _worker(island: Island) -> int | None:
    """The pid of the island's worker: the elastic agent's child running meshtrain.train on its config."""
    marker = str(island.run_dir / "config.toml")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if "meshtrain.train" in args and marker in args:
            return int(entry.name)
    return None


def _kill_after(island: Island, step: int, deadline: float) -> int:
    """SIGKILL the island's worker once its metrics show `step`; returns the step it had reached."""
    while time.monotonic() < deadline and island.proc.poll() is None:
        done = [r["step"] for r in island.records()]
        if done and done[-1] >= step:
            pid = _worker(island)
            assert pid is not None, "no worker process found"
            os.kill(pid, signal.SIGKILL)
            return done[-1]
        time.sleep(0.01)
    raise AssertionError(f"island never reached step {step}:\n{island.text()[-3000:]}")


def _hold_until_registered(survivor: Island, port: int, deadline: float) -> None:
    """Once the survivor has dropped the killed island, stop it (SIGSTOP) until the restarted island
    has registered at the lighthouse as a joiner: on a loaded machine a restart (a fresh interpreter
    importing torch) can take longer than the survivor's remaining steps, and the run would end first."""
    while "island 1 missed the sync" not in survivor.text():
        assert time.monotonic() < deadline and survivor.proc.poll() is None, survivor.text()[-3000:]
        time.sleep(0.01)
    pid = _worker(survivor)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        while not (store.check(["diloco/join/1"]) and store.get("diloco/join/1")):
            assert time.monotonic() < deadline, "island 1 never registered to rejoin"
            time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGCONT)


def _model(run_dir: Path, root: Path) -> dict[str, torch.Tensor]:
    out = root / f"{run_dir.name}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step_{STEPS:08d}", out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state["model"].items()}


@dataclass
class Outcome:
    islands: list[Island]
    killed_at: int
    codes: list[int]
    models: list[dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def elastic(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """The whole scenario once: both tests read it."""
    root = tmp_path_factory.mktemp("elastic")
    lighthouse, port = _lighthouse(root)
    islands: list[Island] = []
    try:
        islands = [_island(root, i, port) for i in (0, 1)]
        killed_at = _kill_after(islands[1], KILL_AFTER, time.monotonic() + 180)
        _hold_until_registered(islands[0], port, time.monotonic() + 180)
        codes = [island.proc.wait(timeout=240) for island in islands]
    finally:
        for proc in [lighthouse] + [island.proc for island in islands]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for island in islands:
        assert island.proc.returncode == 0, island.text()[-4000:]
    return Outcome(islands, killed_at, codes, [_model(island.run_dir, root) for island in islands])


@pytest.mark.e2e
def test_a_killed_island_rejoins_and_ends_identical(elastic: Outcome) -> None:
    zero, one = elastic.islands
    assert elastic.codes == [0, 0]
    # island 0 ran once, start to end; island 1 ran twice (torchrun restarted it) and joined the live run
    assert zero.text().count("INFO model ") == 1 and one.text().count("INFO model ") == 2
    assert [r["step"] for r in zero.records()] == list(range(1, STEPS + 1))
    assert "island 1 missed the sync after step" in zero.text(), zero.text()[-3000:]
    assert "island 1 joins at the sync after step" in zero.text()
    assert "island 1 joins the run at the sync after step" in one.text(), one.text()[-3000:]
    assert [r["step"] for r in one.records()][-1] == STEPS
    a, b = elastic.models
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the islands ended apart"


@pytest.mark.e2e
def test_the_mean_is_over_the_islands_present(elastic: Outcome) -> None:
    """Alone (island 1 dropped), island 0's outer step sends nothing: its mean is its own pseudo-
    gradient; with both, the fp32 all-reduce of one copy of the parameters."""
    zero = elastic.islands[0]
    text = zero.text()
    dropped = int(re.findall(r"island 1 missed the sync after step (\d+)", text)[0])
    joined = int(re.findall(r"island 1 joins at the sync after step (\d+)", text)[0])
    assert elastic.killed_at < dropped < joined
    by_step = {r["step"]: r for r in zero.records()}
    params = by_step[2]["comm_outer_payload_bytes"]
    assert params > 0 and all(by_step[s]["comm_outer_payload_bytes"] == params for s in range(2, dropped, 2))
    assert all(by_step[s]["comm_outer_payload_bytes"] == 0 for s in range(dropped, joined, 2))
    assert by_step[dropped]["outer_wait_s"] >= TIMEOUT_S
    # the sync it joined also carried the outer state to island 1; the later ones are plain again
    assert by_step[joined]["comm_outer_payload_bytes"] > params
    assert all(by_step[s]["comm_outer_payload_bytes"] == params for s in range(joined + 2, STEPS + 1, 2))


# ---- the quorum and the mean, in processes -------------------------------------------------------
QUORUM_TIMEOUT_S = 2.0


def _delta(island: int, step: int) -> torch.Tensor:
    return torch.arange(5, dtype=torch.float32) * (island + 1) + step


def _quorum_island(index: int, env: dict[str, str], port: int, out: str) -> None:
    """Islands 0, 1, 2 sync after step 2; island 2 dies inside the mean after step 4 (the others
    retry without it); index 3 is island 2 restarted, which joins the sync after step 6, comes too
    late for the one after step 8 and takes the state again at the one after step 10."""
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # each island its own world
    from meshtrain.accounting import CommStats
    from meshtrain.diloco import membership

    island = min(index, 2)
    group = membership.ElasticIslands(f"127.0.0.1:{port}", island, 3, 0, QUORUM_TIMEOUT_S, CommStats(), 10)
    lighthouse = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    state = [torch.ones((), dtype=torch.int64), torch.full((5,), 10.0 * (island + 1)), torch.full((3,), -1.0)]
    results: dict[str, object] = {}
    if index == 3:
        while not (lighthouse.check(["diloco/agreed"]) and b'"step": 4' in lighthouse.get("diloco/agreed")):
            time.sleep(0.05)
        state = [torch.zeros((), dtype=torch.int64), torch.zeros(5), torch.zeros(3)]
        results["start"] = group.start(0, state)
        results[6] = group.mean(torch.zeros(5), 6, CommStats(), "fp32", 2048)
        time.sleep(QUORUM_TIMEOUT_S + 1)
        results[8] = group.mean(_delta(island, 8), 8, CommStats(), "fp32", 2048)
        state[1].fill_(-7.0)  # the outer state it kept while left out is not the run's
        results[10] = group.mean(_delta(island, 10), 10, CommStats(), "fp32", 2048)
    else:
        group.start(0, state)
        results[2] = group.mean(_delta(island, 2), 2, CommStats(), "fp32", 2048)
        if island == 2:  # dies once the sync's group is made, before its all-reduce
            membership.mean_over_islands = lambda *a, **k: os._exit(0)  # type: ignore[assignment]
        results[4] = group.mean(_delta(island, 4), 4, CommStats(), "fp32", 2048)
        for step in (6, 8, 10):
            if step != 8:  # island 2 is expected once it registered (restarted, then left out)
                while not (lighthouse.check(["diloco/join/2"]) and lighthouse.get("diloco/join/2")):
                    time.sleep(0.05)
            results[step] = group.mean(_delta(island, step), step, CommStats(), "fp32", 2048)
    torch.save({"results": results, "state": state}, os.path.join(out, f"proc{index}.pt"))
    os._exit(0)


@pytest.mark.dist
def test_a_mean_is_over_the_islands_present_and_a_joiner_gets_the_state(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    import dist_utils  # noqa: F401  (its forkserver preloads torch)

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # the lighthouse
    mp.start_processes(
        _quorum_island, args=(dict(os.environ), store.port, str(tmp_path)), nprocs=4, start_method="forkserver"
    )
    got = {i: torch.load(tmp_path / f"proc{i}.pt") for i in (0, 1, 3)}
    r = {i: got[i]["results"] for i in got}
    assert all(torch.equal(r[i][2], (_delta(0, 2) + _delta(1, 2) + _delta(2, 2)) / 3) for i in (0, 1))
    # island 2 died mid-sync: the survivors' retry averages the two of them
    assert all(torch.equal(r[i][4], (_delta(0, 4) + _delta(1, 4)) / 2) for i in (0, 1))
    # the restarted island 2 joins at step 6 with island 0's state; its zeros do not count
    assert r[3]["start"] == 6
    assert all(torch.equal(r[i][6], (_delta(0, 6) + _delta(1, 6)) / 2) for i in (0, 1, 3))
    # late for the sync after step 8: left out (a zero step); at the next one a joiner again
    assert all(torch.equal(r[i][8], (_delta(0, 8) + _delta(1, 8)) / 2) for i in (0, 1))
    assert torch.equal(r[3][8], torch.zeros(5))
    assert all(torch.equal(r[i][10], (_delta(0, 10) + _delta(1, 10)) / 2) for i in (0, 1, 3))
    assert all(torch.equal(a, b) for a, b in zip(got[3]["state"], got[0]["state"]))


# ---- the quorum's decisions -------------------------------------------------------------------------
@pytest.mark.pure
def test_the_members_are_those_present_and_newcomers_join() -> None:
    sync = propose(8, 0, present={0, 2}, previous={0, 1, 2}, registered=set())
    assert sync.members == (0, 2) and sync.joiners == () and divisor(sync.members, sync.joiners) == 2
    back = propose(10, 0, present={0, 1, 2}, previous={0, 2}, registered={1})
    assert back.joiners == (1,) and back.source == 0 and divisor(back.members, back.joiners) == 2
    # restarted before anyone noticed it had gone: still a joiner, its state is lost
    assert propose(4, 1, present={0, 1}, previous={0, 1}, registered={1}).joiners == (1,)


@pytest.mark.pure
def test_without_an_up_to_date_island_nobody_waits_for_state() -> None:
    assert propose(6, 0, present={1}, previous={0}, registered={1}).joiners == ()


@pytest.mark.pure
def test_an_island_waits_for_those_it_expects_until_the_timeout() -> None:
    assert not gathered({0}, {0, 1}, waited_s=1.0, timeout_s=5.0)
    assert gathered({0}, {0, 1}, waited_s=5.0, timeout_s=5.0)
    assert gathered({0, 1, 2}, {0, 1}, waited_s=0.0, timeout_s=5.0)


@pytest.mark.pure
def test_a_sync_survives_the_store_as_text() -> None:
    sync = Sync(12, 2, (0, 1, 3), (3,))
    assert Sync.decode(sync.encode()) == sync and sync.key == "12/2"


@pytest.mark.pure
def test_join_mode_refuses_the_overlapped_outer_step() -> None:
    from meshtrain.config import ConfigError, load_config
    from meshtrain.validate import validate

    join = ["parallel.diloco=2", "diloco.join=127.0.0.1:29600", "diloco.inner_steps=2"]
    validate(load_config(TINY, join), 1)
    with pytest.raises(ConfigError, match="diloco.join with diloco.overlap=true is not supported"):
        validate(load_config(TINY, [*join, "diloco.overlap=true"]), 1)
