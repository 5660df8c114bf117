"""Issue 8's multi-node test: `scripts/local-cluster.py` (its functions, in this process) starts PostgreSQL, an
MLflow server, a Ray head on 127.0.0.2 and two worker nodes on 127.0.0.3 and 127.0.0.4, sweeps 6 trials over them
with `dynastudy sweep --ray-address --tracking-uri http://... --storage postgresql+psycopg2://...`, and stops
everything. Checked from what the services held before they stopped: trials on both worker nodes, each trial
once in MLflow and FINISHED, every Optuna trial COMPLETE; afterwards no process the cluster started is left.
About 55 s on 2 cores. Skipped without PostgreSQL's server programs or psycopg2 (failed under CI=true).
The first test checks the process bookkeeping that stopping by PID relies on, in a second, without services.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stack import cluster_folder
from study.localcluster import Service, _start, is_loopback, process_table, running, stop_services

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 6


def _script():
    spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "scripts" / "local-cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _mentioning(text: str) -> list[int]:
    """Processes whose command line mentions `text`."""
    pids = []
    for pid in process_table():
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


def test_a_service_is_its_session_and_its_descendants(tmp_path):
    """What LocalCluster relies on, on a tree of `sleep`s: a child in the session and a grandchild that opened a
    session of its own are both found; a leader that ignores SIGTERM is killed after the grace period; a PID
    recorded with another start time (a PID reused by another process) is never signalled."""
    script = "trap '' TERM; sleep 60 & setsid sleep 61 & wait"
    service = _start("tree", ["/bin/sh", "-c", script], tmp_path / "tree.log", dict(os.environ), tmp_path)
    deadline = time.monotonic() + 10

    def settled(table) -> bool:  # all three there, and the grandchild through its setsid (a fork runs it first)
        pids = service.processes(table)
        return len(pids) == 3 and any(table[p].session != service.pid for p in pids)

    while not settled(process_table()) and time.monotonic() < deadline:
        time.sleep(0.05)
    table = process_table()
    pids = service.processes(table)
    assert len(pids) == 3
    assert sorted(table[p].session == service.pid for p in pids) == [False, True, True]  # setsid: own session

    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        real = process_table()[stranger.pid].start
        impostor = Service("impostor", stranger.pid, real + 1)  # same PID, another process
        assert impostor.processes(process_table()) == []
        t0 = time.monotonic()
        stop_services([service, impostor], grace_s=0.5)
        assert 0.5 <= time.monotonic() - t0 < 5  # SIGTERM ignored by the shell: SIGKILL after the grace period
        assert running(service.seen) == [] and len(service.seen) == 3
        assert stranger.poll() is None  # untouched
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_a_sweep_spreads_over_ray_worker_nodes_and_everything_stops(monkeypatch):
    # What a local sweep run earlier in this process leaves in its environment; the cluster must not inherit it.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    folder = cluster_folder()
    script = _script()
    out = io.StringIO()
    t0 = time.monotonic()
    try:
        outcome = script.run(script.parse_args(
            ["--dir", str(folder), "--trials", str(TRIALS), "--concurrency", "2", "--epochs", "1", "--subset", "200",
             "--set", "data.val_size=100", "--set", "data.test_subset=100", "--timeout", "240"]), out)
        seconds = time.monotonic() - t0
        log = out.getvalue()
        print(log, f"\nwall time {seconds:.0f} s")
        facts = outcome.facts
        assert outcome.code == 0, log

        workers = {"127.0.0.3", "127.0.0.4"}
        assert len(facts.nodes) > 1 and set(facts.nodes) <= workers and sum(facts.nodes.values()) == TRIALS, log
        assert len(facts.runs_per_trial) == TRIALS and set(facts.runs_per_trial.values()) == {1}
        assert len(facts.run_status) == TRIALS and set(facts.run_status.values()) == {"FINISHED"}
        assert facts.optuna_states == ["COMPLETE"] * TRIALS
        assert set(facts.optuna_run_ids) == set(facts.run_status)
        for service in ("postgres", "mlflow"):
            assert facts.listening[service] and all(is_loopback(a) for a in facts.listening[service]), facts.listening

        # Everything stopped: every process seen of every service, and anything else that names the folder (Ray's
        # worker processes carry its session path); Ray's address files are gone.
        assert set(outcome.processes) == {"postgres", "mlflow", "ray-head", "ray-w0", "ray-w1"}
        seen = {p: s for procs in outcome.processes.values() for p, s in procs.items()}
        assert len(seen) > 20  # GCS, raylets, agents, Ray's idle workers, PostgreSQL's backends, ...
        assert running(seen) == []
        assert _mentioning(str(folder)) == []
        assert not list((folder / "ray").glob("*/ray_current_cluster"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
