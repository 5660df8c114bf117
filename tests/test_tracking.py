"""The MLflow layout against a real SQLite tracking store."""

from __future__ import annotations

from study.tracking import TAG_FAIL, TAG_HASH, TAG_METHOD, TAG_PARENT, Tracker
from trainables.config import TrialConfig


def test_trial_runs_fail_resume_and_are_found_again(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db")
    exp = tracker.ensure_experiment("s", tmp_path / "art")
    assert tracker.ensure_experiment("s", tmp_path / "art") == exp and tracker.studies() == ["s"]
    parent = tracker.start_sweep(exp, "s", {"trials": 4})
    cfg = TrialConfig.from_flat({"method": "elastic", "model.weights": "linear"})
    run_id = tracker.start_trial(exp, parent, "s", cfg, "t1")
    run = tracker.client.get_run(run_id)
    assert run.data.tags[TAG_PARENT] == parent and run.data.tags[TAG_METHOD] == "elastic"
    assert run.data.tags[TAG_HASH] == cfg.config_hash() and run.data.params["model.weights"] == "linear"
    assert run.data.params["model.exit_weights"] == "[]" and len(run.data.params) == len(cfg.to_flat())
    assert tracker.find_trial(exp, parent, "t1") == run_id and tracker.find_trial(exp, parent, "t2") is None
    tracker.fail(run_id, "worker died")
    assert tracker.status(run_id) == "FAILED"
    tracker.resume_trial(run_id)  # a retry of the same trial continues its one run, failure cleared
    run = tracker.client.get_run(run_id)
    assert run.info.status == "RUNNING" and TAG_FAIL not in run.data.tags
    tracker.log_metrics(run_id, {"val_acc": 0.5, "note": "skipped"}, step=1)
    assert [m.value for m in tracker.client.get_metric_history(run_id, "val_acc")] == [0.5]


def test_passwords_in_urls_are_never_shown():
    from study.tracking import redact

    secret = "postgresql+psycopg2://mlflow:s3cret@db:5432/mlflow"
    assert redact(secret) == "postgresql+psycopg2://mlflow:***@db:5432/mlflow"
    assert redact("http://alice:pw@127.0.0.1:5000") == "http://alice:***@127.0.0.1:5000"
    for url in ("sqlite:////abs/mlflow.db", "http://127.0.0.1:5000", "postgresql://postgres@127.0.0.1:5433/optuna"):
        assert redact(url) == url
