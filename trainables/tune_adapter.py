"""The Ray Tune function trainable: a thin adapter between Tune and the framework-free loop.

It turns Tune's config (Optuna's suggestions) plus the sweep's fixed keys into a `TrialConfig`, resumes from
Tune's checkpoint when there is one (the MLflow run id travels in the checkpoint, so a retried trial keeps its
one run), runs `fit()`, logs each epoch to MLflow and reports it to Tune with a checkpoint. A diverging trial is
reported once with `diverged=1` and its reason (the searcher tells Optuna FAIL) instead of raising, so Tune does
not retry a deterministic failure. The only module of `trainables/` that imports Ray.

MLflow writes go through an `Outbox` (study/outbox.py): training never waits for the tracking server. What has
not arrived when a checkpoint is taken is saved in it, so a trial retried on another node, or the sweep's driver
after the trial ended, delivers it; the last result says how much is still on its way (`tracking_pending`).
Only the trial's run id is needed before its first report: it is looked up or created in a thread while the
trial starts (a trial that starts while the server is down trains meanwhile, and waits for it at its first
report).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from ray import tune

from trainables.config import TrialConfig
from trainables.data import DatasetArrays, make_splits
from trainables.loop import Diverged, RunContext, fit
from trainables.methods import get_method

STATE_FILE = "state.pt"
META_FILE = "meta.json"
END_FLUSH_S = 10.0  # how long an ending trial waits for its writes; the rest goes to the driver via the checkpoint


@dataclasses.dataclass(frozen=True)
class TrialEnv:
    """What every trial of a sweep shares, handed over through Ray's object store."""

    study: str
    fixed: dict[str, dict[str, Any]]  # method -> its fixed keys
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    context: RunContext
    open_timeout_s: float = 600.0  # how long a starting trial waits for the tracking server (it needs a run id)
    # A resumed sweep re-runs trials that may have finished after its last saved state: such a trial must learn
    # that from its run before it trains (`_finished_result`), so it does not train while the run is opened.
    resumed: bool = False


def resolve_config(fixed: dict[str, Any], suggested: dict[str, Any]) -> TrialConfig:
    # Tune's config also holds Optuna's own names of the suggested values (`elastic:model.depth`,
    # `method[resnet,vgg]`; study/search.py), each value also present under its config key: leave those out.
    return TrialConfig.from_flat({**fixed, **{k: v for k, v in suggested.items() if ":" not in k and "[" not in k}})


def bounded_http_retries() -> None:
    """MLflow's HTTP client retries a failed request for about 4 minutes by default, blocking its caller; the
    outbox retries by itself, so each attempt should fail fast. Set once per process, unless the user chose."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _open_run(tracker, env: TrialEnv, cfg: TrialConfig, trial_id: str) -> tuple[str, bool]:
    """The trial's MLflow run when its checkpoint names none: the one an earlier attempt made, else a new one.
    Returns (run id, whether it existed)."""
    from study.outbox import retry

    def find_or_create() -> tuple[str, bool]:
        found = tracker.find_trial(env.experiment_id, env.parent_run_id, trial_id, cfg.config_hash())
        if found is not None:
            return found, True
        return tracker.create_trial_run(env.experiment_id, env.parent_run_id, env.study, cfg, trial_id), False

    return retry(find_or_create, env.open_timeout_s, f"trial {trial_id}: opening its MLflow run",
                 on_wait=lambda m: print(m, file=sys.stderr, flush=True))


class _OpeningRun:
    """`_open_run` in a thread, started with the trial: a fresh trial's search and create (about 0.05 s on
    SQLite, more against a server) overlap its setup and first epoch instead of preceding them
    (benchmarks/sweep_overhead.py). The run id from a checkpoint is known at once."""

    def __init__(self, tracker, env: TrialEnv, cfg: TrialConfig, trial_id: str, run_id: str | None,
                 on_new: Callable[[str], None]) -> None:
        self.seconds = 0.0  # how long the open took (in its thread)
        self._on_new = on_new  # called in the thread with a new run's id: its start writes are queued at once
        self._result: tuple[str, bool] | None = (run_id, True) if run_id is not None else None
        self._error: BaseException | None = None
        self._thread = None
        if run_id is None:
            self._thread = threading.Thread(target=self._open, args=(tracker, env, cfg, trial_id), daemon=True,
                                            name="dynastudy-open-run")
            self._thread.start()

    def _open(self, tracker, env: TrialEnv, cfg: TrialConfig, trial_id: str) -> None:
        t0 = time.perf_counter()
        try:
            result = _open_run(tracker, env, cfg, trial_id)
            self.seconds = time.perf_counter() - t0
            if not result[1]:
                self._on_new(result[0])
            self._result = result
        except BaseException as e:  # re-raised in the trial's own thread by `result`
            self._error = e

    def result(self) -> tuple[str, bool]:
        """(run id, whether it existed), once the open has ended; its error if it failed."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def _finished_result(tracker, env: TrialEnv, run_id: str) -> dict[str, Any] | None:
    """The result a trial's run holds if the trial has finished (status FINISHED with its final metrics)."""
    from study.outbox import retry

    run = retry(lambda: tracker.client.get_run(run_id), env.open_timeout_s, f"reading run {run_id}")
    m = run.data.metrics
    if run.info.status != "FINISHED" or "test_acc" not in m or "val_acc" not in m:
        return None
    epochs = max((h.step for h in tracker.client.get_metric_history(run_id, "val_acc")), default=0)
    return {**m, "val_acc": m["val_acc"], "macs": m.get("macs"), "test_acc": m["test_acc"],
            "macs_full": m.get("macs_full"), "epoch": epochs, "final": 1}


def trainable(config: dict[str, Any], env: TrialEnv, data: DatasetArrays | None) -> None:
    from study.outbox import Outbox
    from study.tracking import (TAG_FAIL, TAG_NODE, TAG_NODES, TAG_NOTES, TAG_RESUMED, TAG_TRACKING, Tracker,
                                final_files, final_metrics, node_name, write_config)

    t_start = time.time()  # wall clock: with `t_end`, the hand-over between trials (benchmarks/sweep_overhead.py)
    started = time.perf_counter()
    bounded_http_retries()
    cfg = resolve_config(env.fixed[config["method"]], config)
    trial_id = tune.get_context().get_trial_id()
    tracker = Tracker(env.tracking_uri)
    box = Outbox(tracker.client)
    state, meta = None, {}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            if (Path(d) / STATE_FILE).is_file():  # a diverged trial's last checkpoint holds no state
                state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
            meta = json.loads((Path(d) / META_FILE).read_text())
            box.adopt(Path(d))  # what the attempt that wrote it had not delivered yet
    # Where a trial's time goes besides `fit` (benchmarks/sweep_overhead.py): its setup before `fit`, opening its
    # run (and how long the trial waited for that), queueing its final results, the end's wait.
    timing: dict[str, float] = {}
    common = {"config_hash": cfg.config_hash(), "method": cfg.method}
    start_epoch = epoch = state["epoch"] if state else 0
    nodes = [*meta.get("nodes", []), node_name()]
    run_id: str | None = None
    existed = False

    def start_writes(new_run: str, retried: bool) -> None:
        """What a start writes: the params and config of a new run, or a retried run's return to RUNNING."""
        if retried:  # a retried trial continues its run: RUNNING again, without the failure of the attempt before
            box.delete_tag(new_run, TAG_FAIL)
            box.status(new_run, "RUNNING")
            box.tag(new_run, TAG_NODE, nodes[-1])
            if state is not None:
                box.tag(new_run, TAG_RESUMED, f"epoch {start_epoch} (checkpoint), attempt {len(nodes)}, "
                                              f"node {nodes[-1]}")
        else:
            box.params(new_run, cfg.to_flat())
            # Written straight into the outbox's spool (no temporary folder, no copy): on a busy disk every folder
            # made and removed costs a few ms, and a 1-s trial makes the difference (benchmarks/sweep_overhead.py).
            box.artifact(new_run, write_config(cfg, box.scratch()), take=True)
        box.tag(new_run, TAG_NODES, ",".join(nodes))
        # One point per attempt (step = attempt): the epoch it started from, 0 for a start from scratch.
        box.metrics(new_run, {"attempt_start_epoch": start_epoch}, step=len(nodes))

    # A new run's start writes are queued by the opening thread (delivered while the trial trains); a run that
    # existed may have finished, and `begin` looks at it first.
    opening = _OpeningRun(tracker, env, cfg, trial_id, meta.get("mlflow_run_id"),
                          on_new=lambda new_run: start_writes(new_run, retried=False))

    def begin() -> dict[str, Any] | None:
        """Wait for the run (and queue a retried run's start writes). Returns the run's logged result instead when
        it had finished already: it ended after the sweep's last saved state and `dynastudy resume` runs it again."""
        nonlocal run_id, existed
        t0 = time.perf_counter()
        run_id, existed = opening.result()
        timing.update(open_s=opening.seconds, open_wait_s=time.perf_counter() - t0)
        common["mlflow_run_id"] = run_id
        if existed:
            if (logged := _finished_result(tracker, env, run_id)) is not None:
                return logged
            start_writes(run_id, retried=True)
        return None

    def replay(logged: dict[str, Any]) -> None:
        box.close(timeout=0)
        tune.report({**logged, **common, "replayed": 1})

    if env.resumed or meta.get("mlflow_run_id"):
        # A run that may have finished is looked at before training (and a known run id costs no wait).
        if (logged := begin()) is not None:
            replay(logged)
            return

    def end(status: str, reason: str | None = None) -> dict[str, Any]:
        """Queue the run's end, wait a little for the server, stop delivering: what is left rides on the
        checkpoint (or is lost with a trial that raises, whose retry replays its last checkpoint instead)."""
        if run_id is None:  # it failed before its first report: the run is needed to say so
            begin()
        t0 = time.perf_counter()
        if reason:
            box.tag(run_id, TAG_FAIL, reason[:5000])
        box.status(run_id, status)
        box.flush(END_FLUSH_S)
        timing["end_wait_s"] = time.perf_counter() - t0
        if box.summary():
            box.tag(run_id, TAG_TRACKING, box.summary())
            box.flush(1.0)
        pending = box.close()
        return {"tracking_pending": pending, "tracking": box.summary()} if pending or box.summary() else {}

    def report_to_tune(result: dict[str, Any], report=None) -> None:
        with tempfile.TemporaryDirectory() as d:
            if report is not None:
                torch.save(report.state(), Path(d) / STATE_FILE)
            (Path(d) / META_FILE).write_text(json.dumps({"mlflow_run_id": run_id, "nodes": nodes}))
            box.save(Path(d))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        fit_started = time.perf_counter()
        timing["setup_s"] = fit_started - started
        tabular = getattr(get_method(cfg.method), "TABULAR", False)  # looks results up: no data to split
        reports = fit(cfg, None if tabular else make_splits(data, cfg.data), env.context, state)
        for report in reports:
            if run_id is None and (logged := begin()) is not None:
                reports.close()
                replay(logged)
                return
            epoch = report.epoch
            box.metrics(run_id, report.metrics, step=report.epoch, skip_logged=existed)
            result = {**report.metrics, **common, "epoch": report.epoch, "final": 0}
            if report.final is not None:
                final_at = time.perf_counter()
                final = report.final
                box.metrics(run_id, final_metrics(final), step=report.epoch)
                if final.notes:
                    box.tag(run_id, TAG_NOTES, "\n".join(final.notes)[:5000])
                for f in final_files(final, box.scratch()):
                    box.artifact(run_id, f, take=True)
                result.update(final=1, test_acc=final.test_acc, macs_full=final.cost.total)
                if final.notes:
                    result["notes"] = " | ".join(final.notes)
                timing["final_s"] = time.perf_counter() - final_at  # its metrics and files queued
                result.update(end("FINISHED"))
                result.update(timing, fit_s=time.perf_counter() - fit_started, t_start=t_start, t_end=time.time())
            if result["final"] and not result.get("tracking_pending"):
                # Nothing is left to hand over, and a finished trial never resumes: no checkpoint to write and
                # persist (a retry after a driver crash finds the FINISHED run and replays it, `_finished_result`).
                tune.report(result)
            else:
                report_to_tune(result, report)
    except Diverged as e:
        # Tune insists on the searched metrics in every result. val_acc 0 ranks a diverged trial last for ASHA;
        # StudySearch tells Optuna FAIL before either value is used.
        ended = end("FAILED", str(e))  # first: it opens the run of a trial that diverged before its first report
        report_to_tune({**common, "epoch": epoch, "final": 0, "diverged": 1, "fail_reason": str(e),
                        "val_acc": 0.0, "macs": float("nan"), **ended})
        return
    except Exception as e:
        end("FAILED", f"{type(e).__name__}: {e}")
        raise
    finally:
        # Tune stopping the trial (a scheduler's decision) ends `tune.report` with SystemExit: what is queued is
        # delivered in the background, since an actor reused for the next trial waits only 2 s for this thread.
        box.detach()
