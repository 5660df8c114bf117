"""The Ray Tune function trainable: a thin adapter between Tune and the framework-free loop.

It turns Tune's config (Optuna's suggestions) plus the sweep's fixed keys into a `TrialConfig`, resumes from
Tune's checkpoint when there is one (the MLflow run id travels in the checkpoint, so a retried trial keeps its
one run), runs `fit()`, logs each epoch to MLflow and reports it to Tune with a checkpoint. A diverging trial is
reported once with `diverged=1` and its reason (the searcher tells Optuna FAIL) instead of raising, so Tune does
not retry a deterministic failure. The only module of `trainables/` that imports Ray.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from trainables.config import TrialConfig
from trainables.data import DatasetArrays, make_splits
from trainables.loop import Diverged, RunContext, fit

STATE_FILE = "state.pt"
META_FILE = "meta.json"


@dataclasses.dataclass(frozen=True)
class TrialEnv:
    """What every trial of a sweep shares, handed over through Ray's object store."""

    study: str
    fixed: dict[str, dict[str, Any]]  # method -> its fixed keys
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    context: RunContext


def resolve_config(fixed: dict[str, Any], suggested: dict[str, Any]) -> TrialConfig:
    # Tune's config also holds Optuna's own names of the suggested values (`elastic:model.depth`,
    # `method[resnet,vgg]`; study/search.py), each value also present under its config key: leave those out.
    return TrialConfig.from_flat({**fixed, **{k: v for k, v in suggested.items() if ":" not in k and "[" not in k}})


def trainable(config: dict[str, Any], env: TrialEnv, data: DatasetArrays) -> None:
    from study.tracking import Tracker

    cfg = resolve_config(env.fixed[config["method"]], config)
    trial_id = tune.get_context().get_trial_id()
    tracker = Tracker(env.tracking_uri)
    state, run_id = None, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
            run_id = json.loads((Path(d) / META_FILE).read_text())["mlflow_run_id"]
    run_id = run_id or tracker.find_trial(env.experiment_id, env.parent_run_id, trial_id)
    if run_id is None:
        run_id = tracker.start_trial(env.experiment_id, env.parent_run_id, env.study, cfg, trial_id)
    else:
        tracker.resume_trial(run_id)

    common = {"mlflow_run_id": run_id, "config_hash": cfg.config_hash(), "method": cfg.method}
    epoch = state["epoch"] if state else 0
    try:
        for report in fit(cfg, make_splits(data, cfg.data), env.context, state):
            epoch = report.epoch
            tracker.log_metrics(run_id, report.metrics, step=report.epoch)
            result = {**report.metrics, **common, "epoch": report.epoch, "final": 0}
            if report.final is not None:
                tracker.log_final(run_id, report.final, step=report.epoch)
                result.update(final=1, test_acc=report.final.test_acc, macs_full=report.final.cost.total)
                if report.final.notes:
                    result["notes"] = " | ".join(report.final.notes)
            with tempfile.TemporaryDirectory() as d:
                torch.save(report.state(), Path(d) / STATE_FILE)
                (Path(d) / META_FILE).write_text(json.dumps({"mlflow_run_id": run_id}))
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))
    except Diverged as e:
        tracker.fail(run_id, str(e))
        # Tune insists on the searched metrics in every result. val_acc 0 ranks a diverged trial last for ASHA;
        # StudySearch tells Optuna FAIL before either value is used.
        tune.report({**common, "epoch": epoch, "final": 0, "diverged": 1, "fail_reason": str(e),
                     "val_acc": 0.0, "macs": float("nan")})
        return
    except Exception as e:
        tracker.fail(run_id, f"{type(e).__name__}: {e}")
        raise
    tracker.finish(run_id)
