"""What the dashboard and the static report read from MLflow, and how it is kept cheap while a sweep runs.

`StudyCache` holds, per study, one summary row per trial run (params, final metrics, status, times) and every
frontier point of every finished trial. The first look at a study pages through its runs once; each refresh after
that asks MLflow only for the runs that ended since the last one and for those still running (two small
queries), and downloads the frontier artifact of a newly finished trial once (cached on disk by run id, as
`dynastudy pareto` does: a finished trial's frontier never changes). Metric histories are never read for the
whole study: `load_trial` reads one run's curves and tables when its trial view is opened.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from study import queries
from study.tracking import (COST, TAG_FAIL, TAG_KIND, TAG_METHOD, TAG_NODE, TAG_NOTES, TAG_PARENT,
                            TAG_STOPPED, TAG_TRIAL, Tracker)

# Per-epoch curves a trial view draws (plus val_acc_exit_<k> and val_acc_head_<i> where the run has them).
CURVES = ("train_loss", "val_acc", "lr", "epoch_time_s", "images_per_s")
# Parquet artifacts a trial view can show, by table name.
TABLES = ("frontier", "gate_rates", "heads", "lottery", "lottery_layers", "lesion")
DOWNLOADS = 8  # frontier artifacts fetched at once
CLOCK_SKEW_MS = 30_000  # how far the clocks of the nodes that end runs may disagree
RUN_COLUMNS = ["run_id", "method", "trial", "kind", "status", "start_time", "end_time", "val_acc", "test_acc",
               "macs", "macs_full", "node", "notes", "fail_reason", "stopped_early", "parent", "artifact_uri",
               "params"]


@dataclasses.dataclass
class TrialData:
    """One trial run as its trial view needs it. `histories` maps a metric key to its (step, value) pairs in step
    order; `tables` maps a table name of TABLES to its DataFrame, present only when the run logged it."""
    run_id: str
    method: str
    trial: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, float]
    tags: dict[str, str]
    histories: dict[str, list[tuple[int, float]]]
    tables: dict[str, pd.DataFrame]
    cost: dict[str, Any] | None  # the cost card (cost.json), where logged

    def exits(self) -> int:
        """How many exits the network has (from its final per-exit metrics)."""
        return sum(1 for k in self.metrics if k.startswith("macs_exit_"))


def _summary(run) -> dict[str, Any]:
    tags, metrics = run.data.tags, run.data.metrics
    return {"run_id": run.info.run_id, "method": tags.get(TAG_METHOD, "?"), "trial": tags.get(TAG_TRIAL, ""),
            "kind": tags.get(TAG_KIND, ""), "status": run.info.status, "start_time": run.info.start_time,
            "end_time": run.info.end_time, "val_acc": metrics.get("val_acc", float("nan")),
            "test_acc": metrics.get("test_acc", float("nan")), "macs": metrics.get("macs", float("nan")),
            "macs_full": metrics.get("macs_full", float("nan")), "node": tags.get(TAG_NODE, ""),
            "notes": tags.get(TAG_NOTES, ""), "fail_reason": tags.get(TAG_FAIL, ""),
            "stopped_early": TAG_STOPPED in tags,  # ASHA stopped it (Optuna: PRUNED)
            "parent": tags.get(TAG_PARENT, ""), "artifact_uri": run.info.artifact_uri,
            "params": {k: queries.param_value(v) for k, v in run.data.params.items()}}


@dataclasses.dataclass
class _Study:
    exp_id: str
    runs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # run id -> summary
    points: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)  # finished run id -> its frontier
    seen_end: int = 0  # largest end_time (ms) read so far
    checked: float = float("-inf")  # time.monotonic() of the last refresh (none yet: the clock may be near 0)
    version: int = 0  # bumped whenever runs or points change
    frame: tuple[int, pd.DataFrame] | None = None  # (version, all points) last assembled
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class StudyCache:
    """Run summaries and frontier points of the studies in one tracking store, refreshed incrementally.

    `min_interval` bounds how often MLflow is asked about one study, however many pages poll it."""

    def __init__(self, tracker: Tracker, cache_dir: Path | None, min_interval: float = 2.0) -> None:
        self.tracker = tracker
        self.cache_dir = cache_dir
        self.min_interval = min_interval
        self._studies: dict[str, _Study] = {}
        self._lock = threading.Lock()
        self.queries = 0  # MLflow search calls made, for tests and the benchmark
        self.frontiers = 0  # frontier artifacts read

    def studies(self) -> list[str]:
        return self.tracker.studies()

    def _search(self, exp_id: str, flt: str) -> list:
        runs, token = [], None
        with queries.gc_paused():  # thousands of runs: see queries.gc_paused
            while True:
                page = self.tracker.client.search_runs([exp_id], filter_string=flt, max_results=queries.PAGE,
                                                       page_token=token)
                self.queries += 1
                runs += list(page)
                token = page.token
                if not token:
                    return runs

    def _entry(self, study: str) -> _Study:
        with self._lock:
            entry = self._studies.get(study)
            if entry is None:
                entry = self._studies[study] = _Study(queries.study_experiment(self.tracker, study))
            return entry

    def refresh(self, study: str, force: bool = False) -> int:
        """Bring one study up to date; returns its version (it changes only when something new arrived)."""
        entry = self._entry(study)
        with entry.lock, queries.gc_paused():
            if not force and time.monotonic() - entry.checked < self.min_interval:
                return entry.version
            trials = f"tags.`{TAG_KIND}` != 'sweep'"
            if entry.seen_end == 0:
                fresh = self._search(entry.exp_id, trials)
            else:
                # Ended since the last look, plus the running ones. End times come from the clocks of the nodes
                # that ran the trials, so the window reaches CLOCK_SKEW_MS further back; rows that did not change
                # are skipped.
                since = max(entry.seen_end - CLOCK_SKEW_MS, 1)
                fresh = self._search(entry.exp_id, f"{trials} and attributes.end_time >= {since}")
                fresh += self._search(entry.exp_id, f"{trials} and attributes.status = 'RUNNING'")
            changed, finished = False, []
            for run in fresh:
                row = _summary(run)
                old = entry.runs.get(row["run_id"])
                if old is not None and old["status"] == row["status"] and old["end_time"] == row["end_time"] \
                        and old["val_acc"] == row["val_acc"]:
                    continue
                entry.runs[row["run_id"]] = row
                changed = True
                if row["end_time"]:
                    entry.seen_end = max(entry.seen_end, int(row["end_time"]))
                entry.points.pop(row["run_id"], None)
                if row["status"] == "FINISHED":
                    finished.append((row["run_id"], row["artifact_uri"]))
            # Downloads wait on the tracking server (or the disk), not on Python: several at once.
            with ThreadPoolExecutor(max_workers=DOWNLOADS) as pool:
                frontiers = pool.map(lambda r: queries.frontier_of(self.tracker, r[0], self.cache_dir, r[1]), finished)
                for (run_id, _), frontier in zip(finished, frontiers):
                    self.frontiers += 1
                    if frontier is not None and not frontier.empty:
                        entry.points[run_id] = frontier
            if entry.seen_end == 0:
                entry.seen_end = 1  # looked once: later refreshes are incremental even while nothing has ended
            entry.checked = time.monotonic()
            if changed:
                entry.version += 1
            return entry.version

    def runs(self, study: str) -> pd.DataFrame:
        """One row per trial run (RUN_COLUMNS), oldest first."""
        self.refresh(study)
        entry = self._entry(study)
        with entry.lock:
            rows = list(entry.runs.values())
        df = pd.DataFrame(rows, columns=RUN_COLUMNS)
        return df.sort_values("start_time", kind="stable").reset_index(drop=True)

    def points(self, study: str) -> pd.DataFrame:
        """Every frontier point of every finished trial, as `queries.frontier_points` gives them (plus the study);
        an empty frame when no trial has finished yet."""
        version = self.refresh(study)
        entry = self._entry(study)
        with entry.lock:
            if entry.frame is not None and entry.frame[0] == version:
                return entry.frame[1]
            items = [(entry.runs[rid], df) for rid, df in entry.points.items()]
        out = queries.label_all([(run["run_id"], run["method"], run["trial"], run["params"], df) for run, df in items])
        if out is None:
            return pd.DataFrame(columns=["run_id", "method", "trial", "policy", "param", "val_acc", "test_acc",
                                         "macs", "test_macs", "params"])
        out.insert(0, "study", study)
        with entry.lock:
            entry.frame = (version, out)
        return out

    def version(self, study: str) -> int:
        return self.refresh(study)


def load_trial(tracker: Tracker, run_id: str) -> TrialData:
    """One run's trial view: its curves (one history query per curve key it has) and its logged tables."""
    from mlflow.exceptions import MlflowException

    run = tracker.get_run(run_id)
    tags, metrics = run.data.tags, dict(run.data.metrics)
    keys = [k for k in metrics if k in CURVES or k.startswith(("val_acc_exit_", "val_acc_head_"))
            or k in ("density", "sparse_macs", "level")]
    histories = {}
    for key in keys:
        hist = sorted(tracker.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        histories[key] = [(m.step, m.value) for m in hist]
    names = {a.path for a in tracker.client.list_artifacts(run_id)}
    tables, cost = {}, None
    with tempfile.TemporaryDirectory() as d:
        for name in TABLES:
            file = f"{name}.parquet"
            if file in names:
                try:
                    tables[name] = pd.read_parquet(tracker.client.download_artifacts(run_id, file, d))
                except (MlflowException, OSError):
                    pass  # an artifact that cannot be read leaves its panel out
        if COST in names:
            try:
                cost = json.loads(Path(tracker.client.download_artifacts(run_id, COST, d)).read_text())
            except (MlflowException, OSError, ValueError):
                cost = None
    return TrialData(run_id=run_id, method=tags.get(TAG_METHOD, "?"), trial=tags.get(TAG_TRIAL, ""),
                     status=run.info.status, params={k: queries.param_value(v) for k, v in run.data.params.items()},
                     metrics=metrics, tags=dict(tags), histories=histories, tables=tables, cost=cost)
