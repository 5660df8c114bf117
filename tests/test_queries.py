"""`queries.frontier_points` with a cache folder (`StudyPoints`, incremental) returns what a full read returns,
against a real SQLite MLflow store, as runs finish, fail, appear, are deleted and restored."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from study import queries
from study.tracking import TAG_KIND, TAG_METHOD, TAG_TRIAL, Tracker
from trainables.hparams import ConfigError


@pytest.fixture()
def study(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    exp = tracker.ensure_experiment("s", tmp_path / "artifacts")
    return tracker, exp, tmp_path


def _frontier(k: int, legacy: bool = False) -> pd.DataFrame:
    df = pd.DataFrame({"policy": ["static", "confidence"], "threshold": [np.nan, 0.5 + k / 100],
                       "exit": [k % 3, -1], "val_acc": [0.5 + k / 100, 0.4 + k / 100],
                       "test_acc": [0.5, 0.4], "macs": [10.0 + k, 5.0 + k], "test_macs": [10.0 + k, 5.0 + k]})
    if not legacy:  # frontiers written before the policy families have no `param` column
        df.insert(1, "param", df["threshold"])
    return df


def _run(study, k: int, method: str = "elastic", status: str = "FINISHED", frontier: bool = True,
         legacy: bool = False) -> str:
    tracker, exp, tmp = study
    run = tracker.client.create_run(exp, tags={TAG_KIND: "trial", TAG_METHOD: method, TAG_TRIAL: f"t{k}"}).info.run_id
    tracker.client.log_param(run, "model.depth", str(20 + k))
    if frontier:
        path = tmp / f"f{k}" / "frontier.parquet"
        path.parent.mkdir()
        _frontier(k, legacy).to_parquet(path, index=False)
        tracker.client.log_artifact(run, str(path))
    if status != "RUNNING":
        tracker.client.set_terminated(run, status)
    return run


def _check(study, cache, method=None, reads=None):
    """The cached answer equals a full read's; returns the StudyPoints used."""
    tracker = study[0]
    full = queries.frontier_points(tracker, "s", method)
    points = queries.StudyPoints(tracker, "s", cache)
    got = points.points(method)
    pd.testing.assert_frame_equal(got, full)
    if reads is not None:
        assert points.frontiers == reads
    return points


def test_incremental_points_equal_a_full_read(study):
    cache = study[2] / "cache"
    for k in range(4):
        _run(study, k)
    _run(study, 4, legacy=True)
    _run(study, 5, method="resnet")
    running = _run(study, 6, status="RUNNING")
    _run(study, 7, status="FAILED")
    _run(study, 8, frontier=False)  # stopped before its final evaluation
    _check(study, cache, reads=7)  # the six finished runs with a frontier, and the one without
    # Everything else from the cache; the run that finished without a frontier is asked again while it is recent
    # (queries.WINDOW_MS: its artifact may still be on its way).
    _check(study, cache, reads=1)
    _check(study, cache, method="resnet", reads=1)

    # A running trial finishes, a new one appears, one is deleted.
    study[0].client.set_terminated(running, "FINISHED")
    _run(study, 9)
    gone = queries.trial_runs(study[0], "s", "resnet")[0].info.run_id
    study[0].client.delete_run(gone)
    points = _check(study, cache)
    assert points.frontiers == 3  # the two new frontiers, and the recent run without one
    with pytest.raises(ConfigError, match="no finished trial with a frontier"):
        queries.frontier_points(study[0], "s", "resnet", cache)
    study[0].client.restore_run(gone)
    _check(study, cache, method="resnet", reads=2)  # the restored run's frontier, and the recent one without


def test_a_broken_cache_costs_only_a_full_read(study):
    cache = study[2] / "cache"
    for k in range(3):
        _run(study, k)
    _check(study, cache)
    for f in cache.glob("study-*.parquet"):
        f.write_bytes(b"not parquet")
    _check(study, cache)
    assert len(list(cache.glob("study-*.json"))) == 1
