"""Try the cluster topology locally: PostgreSQL, an MLflow tracking server, a Ray head (127.0.0.2) and Ray worker
nodes (127.0.0.3, 127.0.0.4, ...; one CPU each) on this machine, a small `dynastudy sweep` on them, and the checks
that it ran as on a real cluster. Everything it starts is stopped at the end, by PID.

    python scripts/local-cluster.py                              # 6 elastic ResNet-20 trials, synthetic data
    python scripts/local-cluster.py --data-dir ../shared/data    # on a CIFAR-10 subset instead
    python scripts/local-cluster.py --dir /tmp/dsc --keep        # leave the services up; prints how to connect
    python scripts/local-cluster.py --dir /tmp/dsc --stop        # stop what --keep left running

Checks (exit code 1 when one fails): trials ran on more than one worker node (MLflow tag dynastudy.node), every
trial is in MLflow exactly once and FINISHED, the Optuna study in PostgreSQL has every trial COMPLETE, and
PostgreSQL and MLflow listen on loopback only. Ray's own gRPC servers listen on every address (Ray has no
setting to bind them to the node address); the cluster keeps Ray's token authentication on.

Needs PostgreSQL's server programs (Debian: `apt-get install postgresql`; `--pg-bin` when they are elsewhere) and
psycopg2 (`pip install -e '.[cluster]'`). About a minute on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file, the project is not importable otherwise
    sys.path.insert(0, str(ROOT))

from study.localcluster import (LocalCluster, find_postgres_bin, inherited_env, is_loopback,  # noqa: E402
                                stop_recorded)

TRIAL_TAGS = ("dynastudy.kind", "dynastudy.trial", "dynastudy.node")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="folder for everything (default: a new /tmp/dsc-XXXX; keep it short: Ray's "
                                 "socket paths must fit 107 bytes)")
    p.add_argument("--workers", type=int, default=2, help="Ray worker nodes, one CPU each")
    p.add_argument("--method", default="elastic")
    p.add_argument("--study", default=f"local-cluster-{time.strftime('%Y%m%d-%H%M%S')}",
                   help="study name (default: local-cluster-<time>, so a reused --dir checks this sweep only)")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--data-dir", help="folder holding cifar10-jpeg.tar.gz: sweep a CIFAR-10 subset (default: "
                                      "synthetic data)")
    p.add_argument("--subset", type=int, help="training images (default: 500 synthetic, 2000 CIFAR-10)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to `dynastudy sweep`")
    p.add_argument("--pg-bin", help="folder of PostgreSQL's initdb and postgres (default: found)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds the sweep may take")
    p.add_argument("--keep", action="store_true", help="leave the services running and print how to use them")
    p.add_argument("--stop", action="store_true", help="stop the services --keep left running in --dir")
    args = p.parse_args(argv)
    if args.stop and not args.dir:
        p.error("--stop needs --dir")
    return args


def sweep_command(cluster: LocalCluster, args: argparse.Namespace, results: Path) -> list[str]:
    if args.data_dir:
        data = ["--dataset", "cifar10", "--data-dir", str(Path(args.data_dir).resolve()),
                "--subset", str(args.subset or 2000)]
        sizes = {"data.val_size": 1000, "data.test_subset": 1000}
    else:
        data = ["--dataset", "synthetic", "--subset", str(args.subset or 500)]
        sizes = {"data.val_size": 200, "data.test_subset": 200}
    if args.method == "elastic":
        sizes["model.depth"] = 20
    given = {s.partition("=")[0] for s in args.set}
    sets = [f"{k}={v}" for k, v in sizes.items() if k not in given] + args.set
    return [cluster.python, "-m", "study.cli", "sweep", "--method", args.method, "--study", args.study, *data,
            "--trials", str(args.trials), "--concurrency", str(args.concurrency), "--epochs", str(args.epochs),
            *[x for s in sets for x in ("--set", s)], "--cpus-per-trial", "1",
            "--ray-address", cluster.ray_address, "--tracking-uri", cluster.tracking_uri,
            "--storage", cluster.storage_url, "--results-dir", str(results)]


def run_sweep(cluster: LocalCluster, cmd: list[str], log: Path, timeout: float, out: TextIO) -> int:
    """The sweep as a user runs it (its own process, the cluster's token in its environment), its output
    followed into `out`; killed with its process group after `timeout` seconds (exit code 124 then)."""
    env = inherited_env()
    env.update(cluster.client_env, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + timeout
    with open(log, "rb") as f:
        while True:
            done = proc.poll() is not None
            chunk = f.read()
            if chunk:
                out.write(chunk.decode(errors="replace"))
                out.flush()
            if done:
                return proc.returncode
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                out.write(f"\nthe sweep ran past --timeout={timeout:.0f} s and was killed\n")
                return 124
            time.sleep(0.3)


@dataclasses.dataclass
class Facts:
    """What the services hold after the sweep."""

    nodes: dict[str, int]  # trial runs per node tag
    runs_per_trial: dict[str, int]  # Tune trial id -> MLflow runs with that trial tag
    run_status: dict[str, str]  # MLflow run id -> status, trial runs only
    optuna_states: list[str]
    optuna_run_ids: list[str]  # the MLflow run id each Optuna trial recorded
    listening: dict[str, set[str]]  # service -> TCP addresses it listens on


def collect(cluster: LocalCluster, study: str) -> Facts:
    import optuna
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cluster.tracking_uri)
    exp = client.get_experiment_by_name(study)
    runs = [] if exp is None else client.search_runs([exp.experiment_id], "tags.`dynastudy.kind` = 'trial'",
                                                     max_results=10_000)
    storage = optuna.storages.RDBStorage(cluster.storage_url)
    try:
        trials = optuna.load_study(study_name=study, storage=storage).trials
    except KeyError:  # no such study
        trials = []
    finally:
        storage.engine.dispose()
    return Facts(nodes=dict(collections.Counter(r.data.tags.get("dynastudy.node", "?") for r in runs)),
                 runs_per_trial=dict(collections.Counter(r.data.tags.get("dynastudy.trial", "?") for r in runs)),
                 run_status={r.info.run_id: r.info.status for r in runs},
                 optuna_states=[t.state.name for t in trials],
                 optuna_run_ids=[t.user_attrs.get("mlflow_run_id", "") for t in trials],
                 listening=cluster.listening())


def check(facts: Facts, trials: int, worker_ips: list[str]) -> list[tuple[bool, str]]:
    """(passed, what) for each check."""
    statuses = collections.Counter(facts.run_status.values())
    twice = sorted(t for t, n in facts.runs_per_trial.items() if n > 1)
    foreign = sorted(set(facts.nodes) - set(worker_ips))
    states = collections.Counter(facts.optuna_states)
    exposed = {name: sorted(a for a in addrs if not is_loopback(a)) for name, addrs in facts.listening.items()
               if name in ("postgres", "mlflow")}
    return [
        (len(facts.nodes) > min(1, len(worker_ips) - 1) and not foreign,
         f"trials ran on {len(facts.nodes)} of {len(worker_ips)} nodes, all Ray worker nodes"
         + (f" (not: {', '.join(foreign)})" if foreign else "")),
        (len(facts.runs_per_trial) == trials and not twice and statuses == {"FINISHED": trials},
         f"{len(facts.run_status)} trial runs in MLflow for {trials} trials, each trial once, all FINISHED "
         f"(statuses {dict(statuses)}" + (f"; more than one run: {twice}" if twice else "") + ")"),
        (states == {"COMPLETE": trials} and set(facts.optuna_run_ids) == set(facts.run_status),
         f"Optuna study in PostgreSQL: {len(facts.optuna_states)} trials (states {dict(states)}), each with its "
         "MLflow run"),
        (not any(exposed.values()),
         "PostgreSQL and MLflow listen on loopback only" + "".join(f"; {n} also on {', '.join(a)}"
                                                                  for n, a in exposed.items() if a)),
    ]


@dataclasses.dataclass
class Outcome:
    code: int
    facts: Facts | None
    checks: list[tuple[bool, str]]
    processes: dict[str, dict[int, int]]  # every process the cluster started: service -> {pid: start time}
    folder: Path


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> Outcome:
    pg_bin = Path(args.pg_bin).resolve() if args.pg_bin else find_postgres_bin()
    if pg_bin is None:
        raise SystemExit("PostgreSQL's server programs (initdb, postgres) were not found: install PostgreSQL "
                         "(Debian: apt-get install postgresql) or pass --pg-bin")
    if args.dir:
        folder = Path(args.dir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix="dsc-", dir="/tmp"))
    if os.geteuid() == 0:
        folder.chmod(0o711)  # PostgreSQL runs as `postgres` and must reach its folder inside
    cluster = LocalCluster(folder, args.workers, pg_bin=pg_bin, python=sys.executable, env={"PYTHONPATH": str(ROOT)})
    t0 = time.monotonic()
    with cluster:
        print(f"cluster up in {time.monotonic() - t0:.0f} s under {folder}: Ray {cluster.ray_address} (workers "
              f"{', '.join(cluster.worker_ips)}), MLflow {cluster.tracking_uri}, Optuna {cluster.storage_url}",
              file=out, flush=True)
        cmd = sweep_command(cluster, args, folder / "results")
        print("$ " + " ".join(cmd[1:]).replace("-m study.cli", "dynastudy", 1), file=out, flush=True)
        rc = run_sweep(cluster, cmd, folder / "logs" / "sweep.log", args.timeout, out)
        facts = collect(cluster, args.study)
        checks = [(rc == 0, f"`dynastudy sweep` exited with {rc}"), *check(facts, args.trials, cluster.worker_ips)]
        print("\ntrials per node (tag dynastudy.node):", file=out)
        for node, n in sorted(facts.nodes.items()):
            print(f"  {node:<12} {n}", file=out)
        for passed, what in checks:
            print(f"{'ok  ' if passed else 'FAIL'}  {what}", file=out)
        if facts.listening.get("ray-head"):
            wide = sorted(a for n, addrs in facts.listening.items() if n.startswith("ray-") for a in addrs
                          if not is_loopback(a))
            if wide:
                print(f"note  Ray's gRPC servers listen on every address ({', '.join(wide)}); token "
                      "authentication is on", file=out)
        code = 0 if all(p for p, _ in checks) else 1
        if args.keep:
            _print_connect(cluster, folder, out)
            cluster.detach()
    return Outcome(code, facts, checks, cluster.processes(), folder)


def _print_connect(cluster: LocalCluster, folder: Path, out: TextIO) -> None:
    here = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0].endswith(".py") else Path(__file__).resolve()
    env = " ".join(f"{k}={v}" for k, v in cluster.client_env.items())
    print(f"""
The services keep running (their PIDs are in {folder / 'cluster.json'}).
  sweep:      {env} dynastudy sweep ... --ray-address {cluster.ray_address} \\
                --tracking-uri {cluster.tracking_uri} --storage {cluster.storage_url} --results-dir {folder}/results
  MLflow UI:  {cluster.tracking_uri}
  Optuna:     optuna-dashboard {cluster.storage_url.replace('+psycopg2', '')} --host 127.0.0.1
  stop:       {sys.executable} {here} --stop --dir {folder}""", file=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stop:
        stopped = stop_recorded(Path(args.dir).resolve())
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    outcome = run(args)
    if not args.keep:
        print(f"everything stopped; results, logs and data are in {outcome.folder}")
    return outcome.code


if __name__ == "__main__":
    sys.exit(main())
