"""How long `dynastudy pareto`, `dynastudy best` and the dashboard's first read take on a large study, against an
SQLite MLflow store and against an MLflow server backed by PostgreSQL.

Fills (or, with --reuse, reads again) a study of N finished trial runs laid out as `benchmarks/dashboard_scale.py`
lays them out (its `frontier` and the same params, tags, metrics and artifacts, from the same random stream), in
  sqlite   a `sqlite:///` store, artifacts on local disk (read in place by the queries)
  server   `mlflow server` on 127.0.0.1 with PostgreSQL behind it and `--serve-artifacts` from local disk (the
           docker-compose topology: the queries download frontiers over HTTP into the frontier cache)
then times, `--repeats` times each (the first with an empty frontier cache: cold; then warm):
  - the commands as a user types them, in a subprocess (wall time, Python start-up included):
    `dynastudy pareto --study S --tracking-uri U` and `dynastudy best --study S --max-macs X --tracking-uri U`
  - the same queries in this process (`queries.frontier_points` + `pareto` / `best_point`), and their part that
    only searches the runs (`queries.trial_runs`), so start-up cost and where the time goes are visible
  - the dashboard's first read of the study (`StudyCache.points`, as dashboard_scale.py times it)
PostgreSQL and the MLflow server are started under --out and stopped at the end, also after an error.

The fill writes what `dashboard_scale.fill` writes, in fewer calls: one `log_batch` with the params and both steps
of metrics, artifacts written straight to where the artifact store keeps them, and for the server the rows
written through MLflow's own SQLAlchemy store on the server's database (the experiment is created through the
server, so the runs' artifact URIs are the server's); SQLite commits without waiting for the disk meanwhile
(`unsynced_sqlite`). `--check-fill K` first fills K trials both ways and compares every param, tag, metric
history and artifact as the queries read them. After the timings, the points the commands read (from the
frontier cache) are checked against the dashboard's, which reads every run and frontier itself.

    python benchmarks/query_scale.py --trials 5000 --out /tmp/qs [--reuse] [--backends sqlite,server] [--json r.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dashboard_scale  # noqa: E402  (its frontier and its fill: the layout both benchmarks read)
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

STUDY = "scale"


# ------------------------------------------------------------------------------------------------ the fill

def _artifact_folder(artifact_uri: str, served_from: Path | None) -> Path | None:
    """Where the artifact store keeps a run's artifacts on this machine's disk: a local (file:) artifact URI, or
    an `mlflow-artifacts:/` one of a server serving artifacts from `served_from`. None: upload instead."""
    from study.queries import _local_artifact

    local = _local_artifact(artifact_uri, "")
    if local is not None:
        return local
    if served_from is not None and artifact_uri.startswith("mlflow-artifacts:"):
        return served_from / artifact_uri[len("mlflow-artifacts:"):].lstrip("/")
    return None


def fast_fill(tracker, study: str, root: Path, start: int, count: int, points: int, rng, *, exp_id: str | None = None,
              served_from: Path | None = None) -> None:
    """What `dashboard_scale.fill(tracker, study, root, start, count, points, rng)` writes, with the same draws
    from `rng`: per trial one create_run (its tags), one log_batch (params, and metrics of steps 1 and 2), the
    config.yaml and frontier.parquet files, one set_terminated. `exp_id`: the study's experiment, made already
    (through the server whose artifact root the runs must get)."""
    from mlflow.entities import Metric, Param
    from mlflow.utils.uri import append_to_uri_path

    from study.tracking import CONFIG, FRONTIER, _param_str, write_config
    from trainables.config import TrialConfig

    client = tracker.client
    exp = exp_id or tracker.ensure_experiment(study, root / "artifacts")
    location = client.get_experiment(exp).artifact_location
    parent = tracker.start_sweep(exp, study, {"trials": count})
    for i in range(start, start + count):
        cfg = TrialConfig.from_flat({"method": "elastic", "seed": i, "optim.lr": float(rng.uniform(0.01, 0.2)),
                                     "model.head_dropout": float(rng.uniform(0, 0.5))})
        run_id = tracker.create_trial_run(exp, parent, study, cfg, f"t{i:05d}")
        f = dashboard_scale.frontier(rng, points)
        op = f.iloc[0]
        ts = int(time.time() * 1000)
        params = [Param(k, _param_str(v)) for k, v in cfg.to_flat().items()]
        assert len(params) <= 100  # MLflow's limit per batch
        metrics = [Metric("train_loss", 1.0, ts, 1), Metric("val_acc", float(op.val_acc), ts, 1)]
        metrics += [Metric(k, float(op[k]), ts, 2) for k in ("val_acc", "test_acc", "macs", "test_macs")]
        client.log_batch(run_id, metrics=metrics, params=params)
        artifact_uri = append_to_uri_path(location, run_id, "artifacts")  # as MLflow's store derives it
        if i == start:
            assert client.get_run(run_id).info.artifact_uri == artifact_uri
        folder = _artifact_folder(artifact_uri, served_from)
        with tempfile.TemporaryDirectory() as d:
            files = [write_config(cfg, Path(d))]
            f.to_parquet(Path(d) / FRONTIER, index=False)
            files.append(Path(d) / FRONTIER)
            if folder is None:
                for file in files:
                    client.log_artifact(run_id, str(file))
            else:
                folder.mkdir(parents=True, exist_ok=True)
                for file in files:
                    shutil.copyfile(file, folder / file.name)
        assert {CONFIG, FRONTIER} == {p.name for p in files}
        tracker.finish(run_id)
    tracker.finish(parent)


@contextlib.contextmanager
def unsynced_sqlite():
    """SQLite connections opened meanwhile commit without waiting for the disk (PRAGMA synchronous=OFF): the
    fill's commits cost about 12 ms each on this machine's disk otherwise. It changes no row, only durability
    across a power cut, and the queries timed later open their own connections."""
    import sqlalchemy
    from sqlalchemy import event

    def unsynced(dbapi_connection, _record) -> None:
        if type(dbapi_connection).__module__.startswith("sqlite3"):
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA synchronous=OFF")
            cur.close()

    event.listen(sqlalchemy.engine.Engine, "connect", unsynced)
    try:
        yield
    finally:
        event.remove(sqlalchemy.engine.Engine, "connect", unsynced)


def _view(tracker, exp_id: str) -> dict:
    """A store's study as the queries see it, without what differs between two fills (ids, times): per trial
    its status, tags, params, latest metrics, metric histories and artifact files (name -> bytes or frame)."""
    import pandas as pd

    from study.tracking import TAG_PARENT

    client = tracker.client
    out = {}
    for run in client.search_runs([exp_id], max_results=1000):
        tags = {k: v for k, v in run.data.tags.items() if k != TAG_PARENT}
        kind = tags.get("dynastudy.kind")
        if kind == "sweep":
            tags.pop("mlflow.runName")  # it holds the time
        key = tags.get("dynastudy.trial", "sweep")
        hist = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
                for k in run.data.metrics}
        files = {}
        with tempfile.TemporaryDirectory() as d:
            for a in client.list_artifacts(run.info.run_id):
                local = Path(client.download_artifacts(run.info.run_id, a.path, d))
                files[a.path] = pd.read_parquet(local).to_json() if a.path.endswith(".parquet") else local.read_bytes()
        out[key] = {"status": run.info.status, "tags": tags, "params": dict(run.data.params),
                    "metrics": dict(run.data.metrics), "histories": hist, "files": files,
                    "parent_is_sweep": (TAG_PARENT in run.data.tags) == (kind != "sweep")}
    return out


def check_fill(slow, fast, trials: int, points: int, root: Path, **fast_kw) -> dict:
    """Fill `trials` trials with dashboard_scale.fill into study `check-slow` of `slow` and with fast_fill into
    `check-fast` of `fast` (which writes to the store `slow` reads), from the same seed; raise unless `slow` reads
    both back the same. Returns the times per trial."""
    t = time.perf_counter()
    dashboard_scale.fill(slow, "check-slow", root, 0, trials, points, np.random.default_rng(1))
    slow_s = time.perf_counter() - t
    exp_id = fast_kw.pop("exp_id_for", lambda study: None)("check-fast")
    t = time.perf_counter()
    fast_fill(fast, "check-fast", root, 0, trials, points, np.random.default_rng(1), exp_id=exp_id, **fast_kw)
    fast_s = time.perf_counter() - t
    a = _view(slow, slow.experiment_id("check-slow"))
    b = _view(slow, slow.experiment_id("check-fast"))
    for tag in ("dynastudy.study",):
        for view, study in ((a, "check-slow"), (b, "check-fast")):
            for run in view.values():
                assert run["tags"].pop(tag) == study
    if a != b:
        diff = [(k, field) for k in sorted(set(a) | set(b)) for field in ("status", "tags", "params", "metrics",
                "histories", "files", "parent_is_sweep") if a.get(k, {}).get(field) != b.get(k, {}).get(field)]
        raise AssertionError(f"the fast fill differs from dashboard_scale.fill: {diff[:10]}")
    return {"check_trials": trials, "check_slow_s_per_trial": round(slow_s / trials, 4),
            "check_fast_s_per_trial": round(fast_s / trials, 4)}


# ------------------------------------------------------------------------------------------------ the server

def tracking_stack(folder: Path):
    """PostgreSQL and an MLflow server serving artifacts from local disk, as study/localcluster.py starts them
    for a local cluster (same options), without its Ray nodes. Stop it with `.stop()`."""
    from study.localcluster import LocalCluster, find_postgres_bin, free_port

    class TrackingStack(LocalCluster):
        def start(self) -> None:
            for sub in ("logs", "mlartifacts"):
                (self.folder / sub).mkdir(parents=True, exist_ok=True)
            self.pg_port, self.mlflow_port = free_port(), free_port()
            self._start_postgres()
            self._start_mlflow()
            self._wait_mlflow()

        def stop(self) -> None:  # nothing of Ray to clean up
            from study.localcluster import stop_services

            services = list(self.services.values())
            self.services.clear()
            stop_services(services, self.grace_s)

    pg_bin = find_postgres_bin()
    if pg_bin is None:
        raise SystemExit("PostgreSQL's server programs are missing: sh scripts/install-test-tools.sh")
    if os.geteuid() == 0:  # PostgreSQL runs as `postgres`, which must reach the folder
        for f in [folder, *folder.parents]:
            if f != Path("/") and not f.stat().st_mode & 0o001:
                f.chmod(f.stat().st_mode | 0o001)
    return TrackingStack(folder, workers=1, pg_bin=pg_bin, python=sys.executable)


# ------------------------------------------------------------------------------------------------ timing

def command(*args: str) -> list[str]:
    """The `dynastudy` command of this interpreter's environment, as a user types it."""
    script = Path(sys.executable).with_name("dynastudy")
    return [str(script), *args] if script.is_file() else [sys.executable, "-m", "study.cli", *args]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("MLFLOW_TRACKING_URI", "DYNASTUDY_HOME", "DYNASTUDY_CACHE")}


def run_timed(args: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=clean_env(), cwd=cwd, timeout=1800)
    s = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return s


def repeat(fn, cold, repeats: int) -> list[float]:
    """`repeats` timings of fn(); `cold()` before the first empties the frontier cache."""
    times = []
    for i in range(repeats):
        if i == 0:
            cold()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def time_backend(name: str, uri: str, results: Path, repeats: int, max_macs: float) -> list[dict]:
    from dashboards.data import StudyCache
    from study import paths, queries
    from study.tracking import Tracker

    cache = paths.cache_dir(results) / "frontiers"  # what the commands use with --results-dir RESULTS

    def empty_cache() -> None:
        shutil.rmtree(paths.cache_dir(results), ignore_errors=True)

    common = ["--study", STUDY, "--tracking-uri", uri, "--results-dir", str(results)]
    rows = []

    def row(what: str, times: list[float]) -> None:
        rows.append({"backend": name, "command": what, "cold_s": round(times[0], 2),
                     "warm_median_s": round(statistics.median(times[1:]), 2) if len(times) > 1 else None,
                     "times_s": [round(t, 3) for t in times], "load_avg_1m": round(os.getloadavg()[0], 2)})
        print(f"  {name:<7} {what:<48} " + " ".join(f"{t:7.2f}" for t in times), flush=True)

    results.mkdir(parents=True, exist_ok=True)
    row("dynastudy --help (start-up)", repeat(lambda: run_timed(command("--help"), results), lambda: None, repeats))
    row("dynastudy pareto", repeat(lambda: run_timed(command("pareto", *common), results), empty_cache, repeats))
    row(f"dynastudy best --max-macs {max_macs:g}",
        repeat(lambda: run_timed(command("best", "--max-macs", str(max_macs), *common), results), empty_cache,
               repeats))

    tracker = Tracker(uri)  # one client for the in-process rows, as a long-lived process keeps it
    row("in-process: trial_runs (search only)",
        repeat(lambda: queries.trial_runs(tracker, STUDY), lambda: None, repeats))
    row("in-process: frontier_points + pareto",
        repeat(lambda: queries.pareto(queries.frontier_points(tracker, STUDY, None, cache)), empty_cache, repeats))
    row("in-process: frontier_points + best_point",
        repeat(lambda: queries.best_point(queries.frontier_points(tracker, STUDY, None, cache), max_macs=max_macs),
               empty_cache, repeats))
    row("dashboard first read (StudyCache.points)",
        repeat(lambda: StudyCache(tracker, cache, min_interval=0).points(STUDY), empty_cache, repeats))

    # The commands' points (from the frontier cache, warm) are the dashboard's, which reads every run itself.
    import pandas as pd

    mine = queries.frontier_points(tracker, STUDY, None, cache)
    theirs = StudyCache(tracker, cache, min_interval=0).points(STUDY).drop(columns="study")
    key = ["run_id", "macs", "val_acc", "param"]
    pd.testing.assert_frame_equal(mine.sort_values(key).reset_index(drop=True)[list(theirs.columns)],
                                  theirs.sort_values(key).reset_index(drop=True))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| backend | command | cold s | warm median s |", "|---|---|---:|---:|"]
    for r in rows:
        warm = "" if r["warm_median_s"] is None else f"{r['warm_median_s']:.2f}"
        lines.append(f"| {r['backend']} | `{r['command']}` | {r['cold_s']:.2f} | {warm} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main

def count_trials(tracker) -> int:
    from study import queries

    return len(queries.trial_runs(tracker, STUDY))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=5000)
    p.add_argument("--points", type=int, default=48, help="frontier points per trial (an elastic trial has ~50)")
    p.add_argument("--out", required=True, help="folder for both stores, PostgreSQL and the caches (emptied first "
                                                "unless --reuse); short, e.g. /tmp/qs")
    p.add_argument("--backends", default="sqlite,server", help="comma-separated: sqlite, server")
    p.add_argument("--reuse", action="store_true", help="time the stores this script filled before")
    p.add_argument("--repeats", type=int, default=3, help="calls per row: one cold, the rest warm")
    p.add_argument("--max-macs", type=float, default=2e7, help="the budget `best` is asked for")
    p.add_argument("--check-fill", type=int, default=0, metavar="K",
                   help="first fill K trials with dashboard_scale.fill and with the fast fill and compare them")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    # SIGTERM and SIGHUP end the script as an error does, so PostgreSQL and the MLflow server are stopped too.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from study.tracking import Tracker

    out = Path(args.out).resolve()
    if not args.reuse:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_name()}",
              "mlflow": mlflow.__version__, "python": platform.python_version(), "trials": args.trials,
              "points_per_trial": args.points, "max_macs": args.max_macs, "fill_s": {}, "rows": []}
    with unsynced_sqlite(), contextlib.ExitStack() as stack:
        for backend in backends:
            print(f"{backend}:", flush=True)
            if backend == "sqlite":
                root = out / "sqlite"
                root.mkdir(exist_ok=True)
                uri = f"sqlite:///{root}/mlflow.db"
                tracker = writer = Tracker(uri)
                kw: dict = {}
                if args.check_fill:
                    result["fill_check_sqlite"] = check_fill(tracker, tracker, args.check_fill, args.points, root)
                    print(f"  fill check: {result['fill_check_sqlite']}", flush=True)
            elif backend == "server":
                root = out / "server"
                root.mkdir(exist_ok=True)
                cluster = tracking_stack(root)
                server = stack.enter_context(contextlib.ExitStack())
                server.callback(cluster.stop)
                t = time.perf_counter()
                cluster.start()
                result["server_start_s"] = round(time.perf_counter() - t, 1)
                result["postgres"] = _postgres_version(cluster)
                uri = cluster.tracking_uri
                tracker = Tracker(uri)
                writer = Tracker(cluster.backend_store_uri)  # the server's database, through MLflow's own store
                served = root / "mlartifacts"
                kw = {"served_from": served, "exp_id": None}
                if args.check_fill:
                    result["fill_check_server"] = check_fill(
                        tracker, writer, args.check_fill, args.points, root, served_from=served,
                        exp_id_for=lambda study: tracker.ensure_experiment(study, None))
                    print(f"  fill check: {result['fill_check_server']}", flush=True)
            else:
                raise SystemExit(f"unknown backend {backend!r}")
            if not args.reuse:
                if backend == "server":
                    kw["exp_id"] = tracker.ensure_experiment(STUDY, None)
                t = time.perf_counter()
                fast_fill(writer, STUDY, root, 0, args.trials, args.points, np.random.default_rng(0), **kw)
                result["fill_s"][backend] = round(time.perf_counter() - t, 1)
                print(f"  filled {args.trials} trials in {result['fill_s'][backend]} s", flush=True)
            have = count_trials(tracker)
            if have != args.trials:
                raise SystemExit(f"{backend}: the study has {have} trials, not {args.trials} (fill again without "
                                 "--reuse)")
            result["rows"] += time_backend(backend, uri, root / "results", args.repeats, args.max_macs)
            if backend == "server":
                server.close()  # stop PostgreSQL and the server now: the next backend runs alone
    print()
    print(table(result["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def _terminate(signum, _frame) -> None:
    raise SystemExit(128 + signum)




def _postgres_version(cluster) -> str:
    import sqlalchemy

    engine = sqlalchemy.create_engine(cluster.backend_store_uri)
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text("show server_version")).scalar()
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
