"""Queries over a study, read from MLflow only, so they work from any machine that can reach the tracking
server: the trial runs, every frontier point of every trial, the non-dominated set with its hypervolume,
and the best operating point under a MACs budget or an accuracy floor as a reproducible config.

Frontier artifacts of finished runs never change, so they are cached locally by run id.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from study.pareto import hypervolume, non_dominated
from study.tracking import FRONTIER, TAG_KIND, TAG_METHOD, TAG_TRIAL, Tracker, redact
from trainables.hparams import ConfigError

PAGE = 1000


def param_value(text: str) -> Any:
    """MLflow stores params as strings; recover numbers, booleans and lists."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        if text in ("True", "False"):
            return text == "True"
        return text


def study_experiment(tracker: Tracker, study: str) -> str:
    exp_id = tracker.experiment_id(study)
    if exp_id is None:
        known = tracker.studies()
        raise ConfigError(f"no study named {study!r} at {redact(tracker.uri)}; studies there: "
                          + (", ".join(known) if known else "none"))
    return exp_id


def trial_runs(tracker: Tracker, study: str, method: str | None = None) -> list:
    """Every trial run of the study (any sweep, any status), paged."""
    exp_id = study_experiment(tracker, study)
    flt = f"tags.`{TAG_KIND}` != 'sweep'"  # trials of sweeps and single runs
    if method:
        flt += f" and tags.`{TAG_METHOD}` = '{method}'"
    runs, token = [], None
    while True:
        page = tracker.client.search_runs([exp_id], filter_string=flt, max_results=PAGE, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


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
        local = tracker.client.download_artifacts(run_id, FRONTIER)
    except Exception:
        return None  # a trial that failed or was stopped before its final evaluation has no frontier
    df = pd.read_parquet(local)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        df.to_parquet(tmp, index=False)
        tmp.replace(cached)
    return df


def frontier_points(tracker: Tracker, study: str, method: str | None = None,
                    cache_dir: Path | None = None) -> pd.DataFrame:
    """All frontier points of all finished trials, with run id, method, trial and the run's params."""
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
    if not frames:
        raise ConfigError(f"study {study!r} has no finished trial with a frontier yet"
                          + (f" for method {method}" if method else ""))
    return pd.concat(frames, ignore_index=True)


def label_points(frontier: pd.DataFrame, run_id: str, method: str, trial: str,
                 params: dict[str, Any]) -> pd.DataFrame:
    """A trial's frontier rows with its run id, method, trial and params (the columns every query reads)."""
    df = frontier.copy()
    if "param" not in df:  # frontiers written before the policy families: param = shared threshold
        df["param"] = df["threshold"]
    df.insert(0, "run_id", run_id)
    df.insert(1, "method", method)
    df.insert(2, "trial", trial)
    df["params"] = [params] * len(df)
    return df


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
