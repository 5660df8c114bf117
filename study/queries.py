"""Queries over a study, read from MLflow only, so they work from any machine that can reach the tracking
server: the trial runs, every frontier point of every trial, the non-dominated set with its hypervolume,
and the best operating point under a MACs budget or an accuracy floor as a reproducible config.

Frontier artifacts of finished runs never change, so they are cached locally by run id. Given a cache folder,
`frontier_points` also keeps the study's points assembled there (`StudyPoints`: one small index and one table
per frontier layout), and a later call asks MLflow only about the runs that can have changed since its last look
(new ones, unfinished ones, recently ended ones, deleted ones) instead of searching every param of every run and
reading one file per trial: on a 5,000-trial study that is the difference between tens of seconds and one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import ViewType

from study.pareto import hypervolume, non_dominated
from study.tracking import FRONTIER, TAG_KIND, TAG_METHOD, TAG_TRIAL, Tracker, redact
from trainables.hparams import ConfigError

PAGE = 1000
DOWNLOADS = 8  # frontier artifacts read at once (a tracking server's downloads wait on the network)
# How far before the last look a run may be stamped as started or ended and still be new to it: the clocks of the
# nodes that write runs disagree, and a write can reach the store a while after its time was taken (retries).
WINDOW_MS = 10 * 60 * 1000
STUDY_FORMAT = 1  # of the files StudyPoints writes; another number: they are rebuilt


def param_value(text: str) -> Any:
    """MLflow stores params as strings; recover numbers, booleans and lists."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        if text in ("True", "False"):
            return text == "True"
        return text


def _experiment(tracker: Tracker, study: str):
    exp = tracker.client.get_experiment_by_name(study)
    if exp is None or exp.lifecycle_stage != "active":
        known = tracker.studies()
        raise ConfigError(f"no study named {study!r} at {redact(tracker.uri)}; studies there: "
                          + (", ".join(known) if known else "none"))
    return exp


def study_experiment(tracker: Tracker, study: str) -> str:
    return _experiment(tracker, study).experiment_id


def _trials_filter(method: str | None = None) -> str:
    flt = f"tags.`{TAG_KIND}` != 'sweep'"  # trials of sweeps and single runs
    if method:
        flt += f" and tags.`{TAG_METHOD}` = '{method}'"
    return flt


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off meanwhile (as it was after). Reading thousands of runs allocates
    hundreds of thousands of objects that live on, and the full collections they set off made MLflow's search of a
    5,000-run SQLite store take 12 s instead of 3.5 s; what it leaves behind is reference-counted away or
    collected after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _search(tracker: Tracker, exp_id: str, flt: str, view: int = ViewType.ACTIVE_ONLY) -> list:
    runs, token = [], None
    with gc_paused():
        while True:
            page = tracker.client.search_runs([exp_id], filter_string=flt, run_view_type=view, max_results=PAGE,
                                              page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs


def trial_runs(tracker: Tracker, study: str, method: str | None = None) -> list:
    """Every trial run of the study (any sweep, any status), paged."""
    return _search(tracker, study_experiment(tracker, study), _trials_filter(method))


def _local_artifact(artifact_uri: str | None, name: str) -> Path | None:
    """The file behind an artifact of a run whose artifacts live on this machine's disk (local stores)."""
    if not artifact_uri or not artifact_uri.startswith(("file:", "/")):
        return None
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(artifact_uri).path)) / name


def frontier_of(tracker: Tracker, run_id: str, cache_dir: Path | None,
                artifact_uri: str | None = None) -> pd.DataFrame | None:
    """A trial's frontier, or None when it has none. Artifacts on the local disk are read in place (MLflow's
    download costs tens of milliseconds a file); others are downloaded once into `cache_dir`."""
    local = _local_artifact(artifact_uri, FRONTIER)
    if local is not None:
        return pd.read_parquet(local) if local.is_file() else None
    cached = cache_dir / f"{run_id}.parquet" if cache_dir else None
    if cached is not None and cached.exists():
        return pd.read_parquet(cached)
    try:
        if artifact_uri:  # from the run's artifact store directly: no request for the run first
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            with tempfile.TemporaryDirectory() as d:
                repo = get_artifact_repository(artifact_uri, tracking_uri=tracker.uri)
                df = pd.read_parquet(repo.download_artifacts(FRONTIER, d))
        else:
            df = pd.read_parquet(tracker.client.download_artifacts(run_id, FRONTIER))
    except Exception:
        return None  # a trial that failed or was stopped before its final evaluation has no frontier
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        df.to_parquet(tmp, index=False)
        tmp.replace(cached)
    return df


def frontier_points(tracker: Tracker, study: str, method: str | None = None,
                    cache_dir: Path | None = None) -> pd.DataFrame:
    """All frontier points of all finished trials, with run id, method, trial and the run's params. With a
    `cache_dir` the study's points are kept there too and brought up to date incrementally (`StudyPoints`); the
    result is the same."""
    if cache_dir is not None:
        points = StudyPoints(tracker, study, Path(cache_dir)).points(method)
    else:
        frames = []
        for run in trial_runs(tracker, study, method):
            if run.info.status != "FINISHED":
                continue
            df = frontier_of(tracker, run.info.run_id, cache_dir, run.info.artifact_uri)
            if df is None or df.empty:
                continue
            frames.append(label_points(df, run.info.run_id, run.data.tags.get(TAG_METHOD, "?"),
                                       run.data.tags.get(TAG_TRIAL, ""),
                                       {k: param_value(v) for k, v in run.data.params.items()}))
        points = pd.concat(frames, ignore_index=True) if frames else None
    if points is None:
        raise ConfigError(f"study {study!r} has no finished trial with a frontier yet"
                          + (f" for method {method}" if method else ""))
    return points


def _with_param(frontier: pd.DataFrame, copy: bool = True) -> pd.DataFrame:
    """A frontier with its `param` column (frontiers written before the policy families: param = shared
    threshold): a copy, or with copy=False the frame itself where it has one."""
    if "param" in frontier and not copy:
        return frontier
    df = frontier.copy()
    if "param" not in df:
        df["param"] = df["threshold"]
    return df


def label_points(frontier: pd.DataFrame, run_id: str, method: str, trial: str,
                 params: dict[str, Any]) -> pd.DataFrame:
    """A trial's frontier rows with its run id, method, trial and params (the columns every query reads)."""
    df = _with_param(frontier)
    df.insert(0, "run_id", run_id)
    df.insert(1, "method", method)
    df.insert(2, "trial", trial)
    df["params"] = [params] * len(df)
    return df


def _by_layout(frontiers: list[tuple[str, pd.DataFrame]],
               layouts: list[list[str]]) -> tuple[dict[int, pd.DataFrame], dict[str, int]]:
    """Non-empty frontiers, each with its `param` column, concatenated per layout (column list; its index in
    `layouts`, which grows by the new ones) behind a run_id column: (table per layout, layout per run id)."""
    groups: dict[int, list[tuple[str, pd.DataFrame]]] = {}
    layout_of = {}
    for run_id, frontier in frontiers:
        df = _with_param(frontier, copy=False)
        layout = list(df.columns)
        if layout not in layouts:
            layouts.append(layout)
        i = layouts.index(layout)
        layout_of[run_id] = i
        groups.setdefault(i, []).append((run_id, df))
    tables = {}
    for i, group in groups.items():
        table = pd.concat([df for _, df in group], ignore_index=True)
        table.insert(0, "run_id", np.repeat([rid for rid, _ in group], [len(df) for _, df in group]))
        tables[i] = table
    return tables, layout_of


def _assemble(tables: list[pd.DataFrame], layouts: list[list[str]], runs: list[tuple[str, str, str, dict]]) \
        -> pd.DataFrame:
    """Concatenating `label_points` of each run's frontier, in the order of `runs` (run id, method, trial, params),
    done at once: `tables` hold the runs' rows behind a run_id column (each run's rows in frontier order), one
    table per layout, `layouts` their column lists in the order the runs first use them."""
    rank = {run[0]: i for i, run in enumerate(runs)}
    df = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0].reset_index(drop=True)
    key = df["run_id"].map(rank).to_numpy()
    order = np.argsort(key, kind="stable")
    df, rows = df.take(order).reset_index(drop=True), key[order]
    for col, pos in (("method", 1), ("trial", 2)):
        values = np.array([run[pos] for run in runs], dtype=object)
        df.insert(pos, col, pd.Series(values[rows].tolist()))
    params = [run[3] for run in runs]
    df["params"] = [params[r] for r in rows]
    # Columns as concatenating the labelled frames orders them: the first run's, then each new one.
    columns: list[str] = []
    for layout in layouts:
        for c in ["run_id", "method", "trial", *layout, "params"]:
            if c not in columns:
                columns.append(c)
    return df[columns]


def label_all(items: list[tuple[str, str, str, dict[str, Any], pd.DataFrame]]) -> pd.DataFrame | None:
    """`pd.concat([label_points(frontier, run_id, method, trial, params) ...], ignore_index=True)` over
    (run_id, method, trial, params, frontier) items with non-empty frontiers, at once (label_points one run at a
    time costs about 1 ms each); None without items."""
    if not items:
        return None
    with gc_paused():
        layouts: list[list[str]] = []
        tables, layout_of = _by_layout([(item[0], item[4]) for item in items], layouts)
        used = list(dict.fromkeys(layout_of[item[0]] for item in items))
        return _assemble([tables[i] for i in used], [layouts[i] for i in used], [item[:4] for item in items])


class StudyPoints:
    """The frontier points of one study's finished trials, kept in `cache_dir` and brought up to date by asking
    MLflow only about the runs that can have changed since the last look:

      - runs not FINISHED (running, failed, killed): their current state, every time
      - runs started or ended within WINDOW_MS before the last look, or after it (new and recently ended runs)
      - deleted runs (a trial deleted in MLflow leaves the result; restored, it comes back)
      - by id, any run known unfinished or deleted last time that none of those returned (it changed meanwhile)

    A FINISHED run is final in a study (a retried trial continues a run that had not finished; a finished one is
    replayed, not rerun), so its params and frontier are read once. A finished run without a frontier (stopped
    early) is asked for one again while it is within the window; one whose artifact store did not answer, at every
    call until it does.

    Files, keyed by the tracking URI, the experiment id and its creation time:
      study-<key>.json             the runs (status, lifecycle stage, times, method, trial, params, frontier
                                   layout) and the time of the last look
      study-<key>-<token>-<i>.parquet   the frontier rows of the finished runs (with run_id), one table per
                                   frontier layout (column list), so each keeps its column types
    Written to a temporary name and renamed: concurrent commands see one whole state or the previous one. A cache
    folder that cannot be written only costs the next call a full read.
    """

    def __init__(self, tracker: Tracker, study: str, cache_dir: Path) -> None:
        self.tracker = tracker
        self.study = study
        self.cache_dir = Path(cache_dir)
        exp = _experiment(tracker, study)
        self.exp_id = exp.experiment_id
        ident = f"{STUDY_FORMAT}\0{tracker.uri}\0{exp.experiment_id}\0{exp.creation_time}"
        self.key = hashlib.sha256(ident.encode()).hexdigest()[:20]
        self.index_file = self.cache_dir / f"study-{self.key}.json"
        self.queries = 0  # MLflow searches made, for tests and benchmarks
        self.frontiers = 0  # frontier artifacts read

    # -------------------------------------------------------------- reading MLflow
    def _search(self, flt: str, view: int = ViewType.ACTIVE_ONLY) -> list:
        self.queries += 1
        return _search(self.tracker, self.exp_id, flt, view)

    @staticmethod
    def _record(run) -> dict[str, Any]:
        info, data = run.info, run.data
        return {"status": info.status, "stage": info.lifecycle_stage, "start": info.start_time,
                "end": info.end_time, "method": data.tags.get(TAG_METHOD, "?"), "trial": data.tags.get(TAG_TRIAL, ""),
                "params": {k: param_value(v) for k, v in data.params.items()}, "layout": None,
                "artifact_uri": info.artifact_uri}

    def _load(self) -> tuple[dict, dict[int, pd.DataFrame]] | None:
        try:
            index = json.loads(self.index_file.read_text())
            if index.get("format") != STUDY_FORMAT or index.get("key") != self.key:
                return None
            tables = {i: pd.read_parquet(self.cache_dir / name) for i, name in enumerate(index["tables"])}
            return index, tables
        except (OSError, ValueError, KeyError, TypeError):
            return None  # none yet, or rewritten meanwhile by another command: read everything again

    def _save(self, index: dict, tables: dict[int, pd.DataFrame]) -> None:
        token = secrets.token_hex(4)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            names = []
            for i, layout in enumerate(index["layouts"]):
                name = f"study-{self.key}-{token}-{i}.parquet"
                table = tables.get(i)
                if table is None:
                    table = pd.DataFrame(columns=["run_id", *layout])
                table.to_parquet(self.cache_dir / name, index=False)
                names.append(name)
            index = {**index, "tables": names}
            tmp = self.index_file.with_name(f"{self.index_file.name}.{token}.tmp")
            tmp.write_text(json.dumps(index))
            tmp.replace(self.index_file)
        except OSError:
            return
        for old in self.cache_dir.glob(f"study-{self.key}-*.parquet"):
            if old.name not in names:
                old.unlink(missing_ok=True)

    def refresh(self) -> tuple[dict, dict[int, pd.DataFrame]]:
        """The study's index and frontier tables, up to date."""
        now = int(time.time() * 1000)
        loaded = self._load()
        trials = _trials_filter()
        if loaded is None:
            index = {"format": STUDY_FORMAT, "key": self.key, "uri": redact(self.tracker.uri),
                     "experiment_id": self.exp_id, "looked": now, "runs": {}, "layouts": []}
            tables: dict[int, pd.DataFrame] = {}
            fresh = self._search(trials, ViewType.ALL)
            gone: set[str] = set()
        else:
            index, tables = loaded
            runs = index["runs"]
            since = index["looked"] - WINDOW_MS
            unfinished = self._search(f"{trials} and attributes.status != 'FINISHED'")
            recent = self._search(f"{trials} and attributes.start_time >= {since}", ViewType.ALL)
            recent += self._search(f"{trials} and attributes.end_time >= {since}", ViewType.ALL)
            deleted = self._search(trials, ViewType.DELETED_ONLY)
            fresh = unfinished + recent + deleted
            seen = {r.info.run_id for r in fresh}
            deleted_ids = {r.info.run_id for r in deleted}
            # Known unfinished (or deleted) last time and in none of the answers: it finished (or came back).
            changed = [rid for rid, rec in runs.items() if rid not in seen and (
                (rec["stage"] == "active" and rec["status"] != "FINISHED")
                or (rec["stage"] != "active" and rid not in deleted_ids))]
            for i in range(0, len(changed), 100):
                ids = ", ".join(f"'{rid}'" for rid in changed[i:i + 100])
                fresh += self._search(f"attributes.run_id IN ({ids})", ViewType.ALL)
            gone = set(changed) - {r.info.run_id for r in fresh}  # deleted for good
        modified = self._apply(index, tables, fresh, gone)
        if modified or now - index["looked"] > WINDOW_MS:
            index["looked"] = now
            self._save(index, tables)
        return index, tables

    def _apply(self, index: dict, tables: dict[int, pd.DataFrame], fresh: list, gone: set[str]) -> bool:
        """Take the runs MLflow returned into the index and read the frontiers of the newly finished ones;
        whether anything changed."""
        runs = index["runs"]
        modified, drop, todo = bool(gone), set(gone), []
        latest = {r.info.run_id: r for r in fresh}  # a run in several answers: the same run
        for rid, run in latest.items():
            rec, old = self._record(run), runs.get(rid)
            same = old is not None and all(old[k] == rec[k] for k in ("status", "stage", "start", "end"))
            final = rec["status"] == "FINISHED" and rec["stage"] == "active"
            if same and not (final and old["layout"] is None):  # unchanged (a finished one without a frontier:
                continue                                         # asked again while it is this recent)
            if not same:
                modified = True
                if old is not None and old["layout"] is not None:
                    drop.add(rid)
                runs[rid] = rec
            if final:
                todo.append(rid)
        for rid in gone:
            runs.pop(rid, None)
        # Finished runs whose frontier could not be read last time (the store did not answer), however old.
        todo += [rid for rid, rec in runs.items() if rid not in latest and rec["status"] == "FINISHED"
                 and rec["stage"] == "active" and rec["layout"] is None and not rec.get("absent")]
        if drop:
            for i, table in list(tables.items()):
                tables[i] = table[~table["run_id"].isin(drop)].reset_index(drop=True)
        with ThreadPoolExecutor(max_workers=DOWNLOADS) as pool:
            frontiers = list(pool.map(lambda rid: frontier_of(self.tracker, rid, self.cache_dir,
                                                              runs[rid]["artifact_uri"]), todo))
        self.frontiers += len(todo)
        found = []
        for rid, frontier in zip(todo, frontiers):
            runs[rid]["layout"] = None
            if frontier is not None and not frontier.empty:
                found.append((rid, frontier))
            else:
                absent = frontier is not None or self._absent(runs[rid]["artifact_uri"])
                modified |= absent != runs[rid].get("absent")
                runs[rid]["absent"] = absent
        new, layout_of = _by_layout(found, index["layouts"])
        for rid, i in layout_of.items():
            runs[rid]["layout"] = i
        for i, table in new.items():
            old = [tables[i]] if i in tables and len(tables[i]) else []
            tables[i] = pd.concat(old + [table], ignore_index=True)
            modified = True
        return modified

    def _absent(self, artifact_uri: str | None) -> bool:
        """Whether a run that gave no frontier surely has none (rather than its artifact store not answering)."""
        if not artifact_uri or _local_artifact(artifact_uri, FRONTIER) is not None:
            return True  # frontier_of looked at the file itself
        try:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            repo = get_artifact_repository(artifact_uri, tracking_uri=self.tracker.uri)
            return FRONTIER not in {a.path for a in repo.list_artifacts()}
        except Exception:
            return False

    # -------------------------------------------------------------- the points
    def points(self, method: str | None = None) -> pd.DataFrame | None:
        """What `frontier_points` returns (without a cache folder) for the study, or None when no finished trial
        has a frontier: rows in MLflow's search order (newest run first), each run's rows in frontier order."""
        with gc_paused():
            return self._points(method)

    def _points(self, method: str | None) -> pd.DataFrame | None:
        index, tables = self.refresh()
        runs = index["runs"]
        chosen = [(rid, rec) for rid, rec in runs.items() if rec["layout"] is not None and rec["stage"] == "active"
                  and rec["status"] == "FINISHED" and (not method or rec["method"] == method)]
        if not chosen:
            return None
        chosen.sort(key=lambda item: (-(item[1]["start"] or 0), item[0]))  # MLflow: start_time DESC, run_uuid
        ids = {rid for rid, _ in chosen}
        used = list(dict.fromkeys(rec["layout"] for _, rec in chosen))
        return _assemble([tables[i][tables[i]["run_id"].isin(ids)] for i in used],
                         [index["layouts"][i] for i in used],
                         [(rid, rec["method"], rec["trial"], rec["params"]) for rid, rec in chosen])


@dataclasses.dataclass
class ParetoResult:
    front: pd.DataFrame
    points: int
    trials: int
    ref_acc: float
    ref_macs: float
    hypervolume: float


def pareto(points: pd.DataFrame, ref_macs: float | None = None, ref_acc: float = 0.0) -> ParetoResult:
    """The non-dominated (val_acc up, macs down) points, cheapest first, and their hypervolume against
    (ref_acc, ref_macs); ref_macs defaults to 1.1 x the largest MACs among the points."""
    acc, macs = points["val_acc"].to_numpy(float), points["macs"].to_numpy(float)
    ref_macs = float(ref_macs if ref_macs is not None else 1.1 * np.nanmax(macs))
    front = points[non_dominated(acc, macs)].sort_values("macs").reset_index(drop=True)
    return ParetoResult(front, len(points), points["run_id"].nunique(), ref_acc, ref_macs,
                        hypervolume(acc, macs, ref_acc, ref_macs))


def best_point(points: pd.DataFrame, max_macs: float | None = None, min_acc: float | None = None) -> pd.Series:
    """Under --max-macs: the most accurate point (fewest MACs on ties). Under --min-acc: the cheapest point
    (most accurate on ties). Validation figures decide; test accuracy is only reported."""
    if (max_macs is None) == (min_acc is None):
        raise ConfigError("give exactly one of --max-macs and --min-acc")
    if max_macs is not None:
        ok = points[points["macs"] <= max_macs]
        if ok.empty:
            raise ConfigError(f"no point needs at most {max_macs:.4g} MACs; the cheapest needs "
                              f"{points['macs'].min():.4g}")
        return ok.sort_values(["val_acc", "macs"], ascending=[False, True]).iloc[0]
    ok = points[points["val_acc"] >= min_acc]
    if ok.empty:
        raise ConfigError(f"no point reaches val_acc {min_acc}; the best reaches {points['val_acc'].max():.4f}")
    return ok.sort_values(["macs", "val_acc"], ascending=[True, False]).iloc[0]


def point_overrides(point: pd.Series) -> dict[str, Any]:
    """Config keys a frontier point evaluated differently from its trial (frontiers before this column: none)."""
    text = point.get("overrides", "{}")
    return json.loads(text) if isinstance(text, str) and text else {}


def point_config(point: pd.Series) -> dict[str, Any]:
    """The flat config that reproduces a frontier point: its run's params with the point's evaluation-only
    overrides (an AIG gate cut-off, a lottery trial's earlier level) and its exit policy. A budgeted point keeps
    its prior q (a retrained network derives its own thresholds on its validation split); its thresholds on this
    trial are in the point's `thresholds`."""
    cfg = dict(point["params"])
    cfg.update(point_overrides(point))
    policy = point["policy"]
    cfg["policy.name"] = policy
    if policy == "static":
        cfg["policy.exit"] = int(point["exit"])
        return cfg
    param = point.get("param", float("nan"))
    if policy == "budgeted":
        cfg["policy.q"] = float(param)
        return cfg
    per_exit = json.loads(point.get("thresholds", "[]") or "[]")
    if policy == "entropy":
        cfg["policy.entropies"] = per_exit
        if not per_exit:
            cfg["policy.entropy"] = float(param)
        return cfg
    cfg["policy.thresholds"] = per_exit
    if not per_exit:
        cfg["policy.threshold"] = float(point["threshold"])
    return cfg
