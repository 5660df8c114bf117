"""Issue 8's "no trial lost": three crashes on one local cluster (study/localcluster.py: PostgreSQL, an MLflow
server, a Ray head on 127.0.0.2 and worker nodes on 127.0.0.3 and 127.0.0.4), each in the middle of a real
`dynastudy sweep` of synthetic data run as a user runs it (its own process, the cluster's service flags):

- the tracking server stopped for 30 s: the trials keep training, what they logged meanwhile arrives later;
- the sweep's driver killed with SIGKILL: `dynastudy resume --study` finishes the sweep;
- a Ray worker node killed with SIGKILL: its trials continue from their checkpoints on the other node.

Each checks MLflow (every trial once, FINISHED, its whole metric history, nothing RUNNING) and the Optuna study in
PostgreSQL (every trial COMPLETE), and writes its figures to test-artifacts/reliability.json (BENCHMARKS.md,
Reliability). The cluster is shared; the worker kill goes last. Bounded: each sweep is killed after its timeout.
Skipped without PostgreSQL's server programs or psycopg2 (failed under CI=true).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stack import cluster_folder
from study.localcluster import LocalCluster, find_postgres_bin, inherited_env

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 4
EPOCHS = 6
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def cluster():
    folder = cluster_folder()
    # Faster detection of a dead node than Ray's default (about 30 s): the worker-kill test waits for it.
    env = {"PYTHONPATH": str(ROOT), "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5",
           "RAY_health_check_timeout_ms": "1000"}
    try:
        with LocalCluster(folder, 2, pg_bin=find_postgres_bin(), python=sys.executable, env=env) as c:
            yield c
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Sweep:
    """A `dynastudy` command on the cluster in its own process, its output in a log."""

    def __init__(self, cluster: LocalCluster, study: str, command: str = "sweep", *extra: str,
                 env: dict[str, str] | None = None, storage: str | None = None) -> None:
        self.cluster, self.study = cluster, study
        self.results = cluster.folder / "results"
        services = ["--ray-address", cluster.ray_address, "--tracking-uri", cluster.tracking_uri,
                    "--storage", storage or cluster.storage_url, "--results-dir", str(self.results)]
        if command == "sweep":
            args = ["sweep", "--method", "elastic", "--study", study, "--dataset", "synthetic", "--subset", "300",
                    "--trials", str(TRIALS), "--concurrency", "2", "--epochs", str(EPOCHS), "--cpus-per-trial", "1",
                    "--set", "model.depth=20", "--set", "data.val_size=100", "--set", "data.test_subset=100",
                    "--seed", "1", *extra]
        else:
            args = [command, "--study", study, *extra]
        env = {**inherited_env(), **(env or {})}
        env.update(cluster.client_env, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.log = cluster.folder / "logs" / f"{study}-{command}.log"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "study.cli", *args, *services], stdout=f,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"dynastudy {self.study} ran past {timeout:.0f} s:\n{self.output()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _client(cluster: LocalCluster):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cluster.tracking_uri)


def _trial_runs(cluster: LocalCluster, study: str) -> list:
    client = _client(cluster)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`dynastudy.kind` = 'trial'", max_results=1000)


def _wait_for(what: str, predicate, sweep: Sweep, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = predicate()
        except Exception:  # the server restarting, a table not there yet
            found = None
        if found:
            return found
        if sweep.proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}:\n{sweep.output()}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout:.0f} s:\n{sweep.output()}")


def _epochs_logged(cluster: LocalCluster, run) -> list[int]:
    return sorted(m.step for m in _client(cluster).get_metric_history(run.info.run_id, "train_loss"))


def _running_with_epochs(cluster: LocalCluster, study: str, at_least: int, node: str | None = None):
    for run in _trial_runs(cluster, study):
        if run.info.status == "RUNNING" and (node is None or run.data.tags.get("dynastudy.node") == node):
            if len(_epochs_logged(cluster, run)) >= at_least:
                return run
    return None


def _check_study(cluster: LocalCluster, study: str, storage_url: str | None = None) -> dict:
    """What every crash must leave: each trial once in MLflow, FINISHED with every epoch logged once, and every
    Optuna trial of the study finished (COMPLETE, or FAIL for one lost with the driver). Returns the figures."""
    import optuna

    runs = _trial_runs(cluster, study)
    live = [r for r in runs if "dynastudy.lost" not in r.data.tags]
    per_trial = collections.Counter(r.data.tags["dynastudy.trial"] for r in live)
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == [], \
        [r.data.tags for r in runs if r.info.status == "RUNNING"]
    assert len(live) == TRIALS and set(per_trial.values()) == {1}, per_trial
    assert {r.info.status for r in live} == {"FINISHED"}
    for run in live:
        assert _epochs_logged(cluster, run) == list(range(1, EPOCHS + 1)), run.data.tags
        assert "test_acc" in run.data.metrics and "frontier.parquet" in {
            a.path for a in _client(cluster).list_artifacts(run.info.run_id)}
    storage = optuna.storages.RDBStorage(storage_url or cluster.storage_url)
    try:
        trials = optuna.load_study(study_name=study, storage=storage).trials
    finally:
        storage.engine.dispose()
    states = collections.Counter(t.state.name for t in trials)
    assert states["COMPLETE"] == TRIALS and states["RUNNING"] == 0, states
    assert {t.user_attrs.get("mlflow_run_id") for t in trials if t.state.name == "COMPLETE"} == \
        {r.info.run_id for r in live}
    resumed = [r for r in live if "dynastudy.resumed_from" in r.data.tags]
    return {"trials_requested": TRIALS, "finished": len(live), "lost": len(runs) - len(live),
            "duplicated": sum(n - 1 for n in per_trial.values()), "resumed_from_checkpoint": len(resumed),
            "optuna": dict(states), "resumed": {r.data.tags["dynastudy.trial"]: r.data.tags["dynastudy.resumed_from"]
                                                for r in resumed}}


def _record(name: str, figures: dict) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "reliability.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = {**figures, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs"}
    path.write_text(json.dumps(data, indent=1))
    print(name, json.dumps(figures))


@pytest.mark.timeout(400)
def test_tracking_server_down_for_30_s(cluster):
    sweep = Sweep(cluster, "down")
    try:
        _wait_for("a trial with an epoch logged", lambda: _running_with_epochs(cluster, "down", 1), sweep)
        cluster.stop_tracking()
        t_down = time.time()
        time.sleep(30)
        assert sweep.proc.poll() is None  # the sweep did not give up
        cluster.start_tracking()
        t_up = time.time()
        assert sweep.wait(300) == 0, sweep.output()
    finally:
        sweep.kill()
        if "mlflow" not in cluster.services:
            cluster.start_tracking()
    figures = _check_study(cluster, "down")
    # Trials went on training during the outage and their writes waited: the runs say so.
    runs = _trial_runs(cluster, "down")
    notes = [r.data.tags["dynastudy.tracking"] for r in runs if "dynastudy.tracking" in r.data.tags]
    assert notes and all("waited" in n or "driver delivered them" in n for n in notes), notes
    # Epochs trained while the server was down (metrics keep the time they were logged at) arrived.
    during = [m for r in runs for m in _client(cluster).get_metric_history(r.info.run_id, "train_loss")
              if t_down * 1000 < m.timestamp < t_up * 1000]
    assert during
    _record("tracking server down", {**figures, "outage_s": round(t_up - t_down), "epochs_trained_during_outage":
                                     len(during), "trials_whose_writes_waited": len(notes), "notes": notes})


def _saved_with_a_checkpoint(cluster: LocalCluster, study: str) -> list[str]:
    """RUNNING trials Tune's saved state must know (started 4 s ago, state saved every 2 s) that have a
    checkpoint for sure (two epochs logged: metrics may arrive just before their checkpoint) and are not about to
    finish (two epochs to go)."""
    now_ms = time.time() * 1000
    return [r.data.tags["dynastudy.trial"] for r in _trial_runs(cluster, study) if r.info.status == "RUNNING"
            and r.info.start_time < now_ms - 4000 and 2 <= len(_epochs_logged(cluster, r)) <= EPOCHS - 2]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("optuna_db", ["postgresql", "sqlite"])
def test_driver_killed_then_resumed(cluster, optuna_db):
    # On a SQLite file the driver serves the Optuna study from memory and writes it behind (study/storage.py):
    # what the killed driver had queued is lost, and the resumed one loads the study from the file again.
    storage = f"sqlite:///{cluster.folder}/optuna-driver.db" if optuna_db == "sqlite" else None
    study = f"driver-{optuna_db}"
    # Tune saves the sweep's state every 10 s or more by default: a trial started since is unknown to `resume`
    # (closed as lost and replaced; BENCHMARKS.md has a run with the default). Every 2 s here, so that the kill
    # surely hits a trial that resume continues from its checkpoint. Twice the data per epoch: on an idle machine
    # 300 images made 1-s epochs, and the kill's window (a trial 4 s in with at most EPOCHS - 2 epochs) so
    # short that polling missed it and the sweep finished first.
    sweep = Sweep(cluster, study, "sweep", "--subset", "600", env={"TUNE_GLOBAL_CHECKPOINT_S": "2"},
                  storage=storage)
    try:
        checkpointed = _wait_for("one finished trial and one two epochs in", lambda: any(
            r.info.status == "FINISHED" for r in _trial_runs(cluster, study)) and _saved_with_a_checkpoint(
            cluster, study), sweep, timeout=240)
        os.kill(sweep.proc.pid, signal.SIGKILL)  # the driver alone, as a crash would
        sweep.proc.wait()
        before = {r.data.tags["dynastudy.trial"]: r.info.status for r in _trial_runs(cluster, study)}
    finally:
        sweep.kill()
    finished_before = {t for t, s in before.items() if s == "FINISHED"}
    resume = Sweep(cluster, study, "resume", storage=storage)
    try:
        assert resume.wait(300) == 0, resume.output()
    finally:
        resume.kill()
    figures = _check_study(cluster, study, storage)
    runs = {r.data.tags["dynastudy.trial"]: r for r in _trial_runs(cluster, study)
            if "dynastudy.lost" not in r.data.tags}
    for trial in finished_before:  # not trained again: one attempt, started from scratch
        history = _client(cluster).get_metric_history(runs[trial].info.run_id, "attempt_start_epoch")
        assert [m.value for m in history] == [0.0], trial
    interrupted = [t for t, s in before.items() if s == "RUNNING" and t in runs]
    assert checkpointed and all(t in runs and "dynastudy.resumed_from" in runs[t].data.tags
                                for t in checkpointed), (checkpointed, before)
    sweep_run = [r for r in _client(cluster).search_runs(
        [runs[interrupted[0]].info.experiment_id], "tags.`dynastudy.kind` = 'sweep'")]
    assert len(sweep_run) == 1 and sweep_run[0].info.status == "FINISHED"
    assert sweep_run[0].data.tags["dynastudy.resumes"] == "1"
    _record(f"driver killed, then dynastudy resume (Optuna on {optuna_db})", {
        **figures, "finished_before_the_kill": len(finished_before), "running_at_the_kill": len(interrupted)})


@pytest.mark.timeout(400)
def test_worker_node_killed(cluster):
    victim = cluster.worker_ips[0]
    sweep = Sweep(cluster, "worker")
    try:
        run = _wait_for(f"a trial on {victim} in its second epoch",
                        lambda: _running_with_epochs(cluster, "worker", 2, node=victim), sweep)
        killed = cluster.kill_worker(0)
        assert killed
        assert sweep.wait(300) == 0, sweep.output()
    finally:
        sweep.kill()
    figures = _check_study(cluster, "worker")
    moved = [r for r in _trial_runs(cluster, "worker") if r.data.tags["dynastudy.trial"] ==
             run.data.tags["dynastudy.trial"]][0]
    nodes = moved.data.tags["dynastudy.nodes"].split(",")
    assert nodes[0] == victim and nodes[-1] != victim  # it finished on the surviving node
    assert moved.data.tags["dynastudy.resumed_from"].startswith("epoch ") and \
        not moved.data.tags["dynastudy.resumed_from"].startswith("epoch 0"), moved.data.tags
    assert "retrying from epoch" in sweep.output()
    _record("worker node killed", {**figures, "trials_on_the_killed_node": "moved to " + nodes[-1]})
