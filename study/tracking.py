"""MLflow layout of a study: every name, tag and metric key the platform writes or reads is defined here.

  experiment      one per study (its name), artifacts under the results root for local stores
  sweep run       one parent run per `dynastudy sweep` invocation (tag dynastudy.kind=sweep)
  trial run       one child run per trial (tag mlflow.parentRunId), created inside the trial so it can log
                  artifacts; params = the flat resolved config; tags: study, method, trial, config hash, node
  metrics         per epoch (step = epoch): train_loss, val_acc, macs, epoch_time_s, images_per_s, lr,
                  val_acc_exit_<k>; at the end: val_acc, test_acc, macs, test_macs, macs_full,
                  val_acc_exit_<k>, test_acc_exit_<k>, macs_exit_<k>, exit_fraction_<k>, train_macs;
                  gated networks: gate_rate_<l> (validation execution rate of gated layer l), gate_rate_mean;
                  networks with side heads (DHM, DSL): val_acc_head_<i> per epoch, test_acc_head_<i> at the end;
                  lottery tickets: per pruning level (step = level + 1): level, density, val_acc, test_acc,
                  macs = sparse_macs, dense_macs, and the controls' reinit_/random_mask_ val/test accuracy
  notes           tag dynastudy.notes: findings of the trial worth a look (a side head beating head 0) and
                  facts of its model (`model.notes`: where a torchvision backbone's weights came from, or from scratch)
  artifacts       frontier.parquet (every operating point of the exit-policy grid), cost.json, config.yaml,
                  model.pt (the trained state_dict), gate_rates.parquet (gated networks: rate per layer per
                  class), heads.parquet (side heads: accuracy and path MACs per head), lottery.parquet +
                  lottery_layers.parquet (lottery tickets: per level; per layer at the last), lesion.parquet +
                  lesion.png (after `dynastudy lesion`)

Only the MlflowClient API is used (no global active run), so several trials can log from one process.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from study.paths import sqlite_file
from trainables.hparams import ConfigError

TAG_STUDY = "dynastudy.study"
TAG_KIND = "dynastudy.kind"  # sweep | trial | run
TAG_METHOD = "dynastudy.method"
TAG_TRIAL = "dynastudy.trial"
TAG_HASH = "dynastudy.config_hash"
TAG_NODE = "dynastudy.node"
TAG_FAIL = "dynastudy.fail_reason"
TAG_STOPPED = "dynastudy.stopped_early"
TAG_NOTES = "dynastudy.notes"
TAG_NODES = "dynastudy.nodes"  # every node the trial ran on, in order (a retried trial moves)
TAG_RESUMED = "dynastudy.resumed_from"  # the checkpoint the trial's last attempt started from
TAG_TRACKING = "dynastudy.tracking"  # what waited for (or never reached) the tracking server
TAG_LOST = "dynastudy.lost"  # a trial run `dynastudy resume` found orphaned (its trial was lost with the driver)
TAG_TUNE_PATH = "dynastudy.tune_experiment"  # sweep run: where Tune keeps the sweep's state (for resume)
TAG_RESUMES = "dynastudy.resumes"  # sweep run: how many times `dynastudy resume` continued it
TAG_PARENT = "mlflow.parentRunId"
FRONTIER = "frontier.parquet"
COST = "cost.json"
CONFIG = "config.yaml"
WEIGHTS = "model.pt"
LOTTERY_TABLE = "lottery.parquet"


def default_tracking_uri(results_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results_dir / 'mlflow.db'}"


def redact(url: str) -> str:
    """A URL as it may be printed or logged: a password in it replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def _check_database(url: str, what: str) -> None:
    """Connect to a database URL (SQLAlchemy) once; one line on failure."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            if url.startswith("sqlite"):
                conn.execute(sqlalchemy.text("select count(*) from sqlite_master"))
        engine.dispose()
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ConfigError(f"{what} {redact(url)} is unusable ({type(e).__name__}: {first})") from None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail with one line unless `uri` is a usable MLflow tracking URI. Writes nothing."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme not in ("sqlite", "http", "https") and not scheme.startswith(("postgresql", "mysql")):
        raise ConfigError(f"tracking URI {redact(uri)!r} is not supported; valid: sqlite:////abs/path.db, "
                          "http(s)://host:port (an MLflow server), postgresql://user@host:port/db")
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                r.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(f"tracking server {redact(uri)} is unreachable ({reason}); start it or pass another "
                              "--tracking-uri") from None
    elif scheme == "sqlite":
        path = sqlite_file(uri)
        if path is None or not path.is_absolute():
            raise ConfigError(f"tracking URI {uri!r} must name an absolute path (sqlite:////abs/path.db)")
        if path.exists():
            _check_database(uri, "tracking store")
            return
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"tracking URI {uri!r}: {parent} is not writable")
    else:
        _check_database(uri, "tracking store")


def check_readable(uri: str) -> None:
    """For commands that only read: the store must exist already (opening an SQLite URI would create it)."""
    check_reachable(uri)
    path = sqlite_file(uri)
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"no tracking store at {redact(uri)} (no sweep has written there yet); pass "
                              "--tracking-uri or --results-dir of an existing study")


class Tracker:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)

    # ------------------------------------------------------------------ experiments and sweeps
    def experiment_id(self, study: str) -> str | None:
        exp = self.client.get_experiment_by_name(study)
        return exp.experiment_id if exp is not None and exp.lifecycle_stage == "active" else None

    def ensure_experiment(self, study: str, artifact_root: Path | None) -> str:
        exp_id = self.experiment_id(study)
        if exp_id is not None:
            return exp_id
        location = (artifact_root / study).resolve().as_uri() if artifact_root is not None and is_local(self.uri) \
            else None
        try:
            return self.client.create_experiment(study, artifact_location=location, tags={TAG_STUDY: study})
        except Exception:  # another process created it first
            exp_id = self.experiment_id(study)
            if exp_id is None:
                raise
            return exp_id

    def studies(self) -> list[str]:
        return sorted(e.name for e in self.client.search_experiments(filter_string=f"tags.`{TAG_STUDY}` != ''"))

    def start_sweep(self, exp_id: str, study: str, params: dict[str, Any]) -> str:
        run = self.client.create_run(exp_id, run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                                     tags={TAG_STUDY: study, TAG_KIND: "sweep", TAG_NODE: node_name()})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    # ------------------------------------------------------------------ trials
    def search_all(self, exp_id: str, filter_string: str, page: int = 1000) -> list:
        """Every run matching `filter_string`, page by page (`search_runs` alone returns at most 1,000)."""
        runs, token = [], None
        while True:
            found = self.client.search_runs([exp_id], filter_string=filter_string, max_results=page,
                                            page_token=token)
            runs += list(found)
            token = found.token
            if not token:
                return runs

    def find_trial(self, exp_id: str, parent_run_id: str, trial_id: str, config_hash: str | None = None) -> str | None:
        """The run already made for this trial (a retried trial must not make a second one). A run of the same
        trial id but another configuration, or one `dynastudy resume` marked lost, is another trial."""
        runs = self.client.search_runs([exp_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and "
                                                               f"tags.`{TAG_TRIAL}` = '{trial_id}'")
        for run in runs:
            tags = run.data.tags
            if TAG_LOST not in tags and (config_hash is None or tags.get(TAG_HASH) == config_hash):
                return run.info.run_id
        return None

    def create_trial_run(self, exp_id: str, parent_run_id: str | None, study: str, cfg, trial_id: str,
                         kind: str = "trial") -> str:
        """The trial's run with its tags, and nothing else (one call: safe to retry after a failure)."""
        tags = {TAG_STUDY: study, TAG_KIND: kind, TAG_METHOD: cfg.method, TAG_TRIAL: trial_id,
                TAG_HASH: cfg.config_hash(), TAG_NODE: node_name()}
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        run = self.client.create_run(exp_id, run_name=f"{trial_id}-{cfg.method}-{cfg.config_hash()[:8]}", tags=tags)
        return run.info.run_id

    def start_trial(self, exp_id: str, parent_run_id: str | None, study: str, cfg, trial_id: str,
                    kind: str = "trial") -> str:
        run_id = self.create_trial_run(exp_id, parent_run_id, study, cfg, trial_id, kind)
        self.log_params(run_id, cfg.to_flat())
        with tempfile.TemporaryDirectory() as d:
            self.client.log_artifact(run_id, str(write_config(cfg, Path(d))))
        return run_id

    def resume_trial(self, run_id: str) -> None:
        """A retried trial continues its run: RUNNING again, without the failure of the previous attempt."""
        if TAG_FAIL in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, TAG_FAIL)
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, _param_str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def log_final(self, run_id: str, final, step: int) -> None:
        """The trial's result: operating point, per-exit accuracy and cost, the frontier and the cost card."""
        self.log_metrics(run_id, final_metrics(final), step)
        if final.notes:
            self.client.set_tag(run_id, TAG_NOTES, "\n".join(final.notes)[:5000])
        with tempfile.TemporaryDirectory() as d:
            for f in final_files(final, Path(d)):
                self.client.log_artifact(run_id, str(f))

    def log_artifacts(self, run_id: str, files: dict[str, Any]) -> None:
        """Write {file name: DataFrame | bytes | str} to the run's artifacts."""
        with tempfile.TemporaryDirectory() as d:
            for name, obj in files.items():
                path = Path(d) / name
                if hasattr(obj, "to_parquet"):
                    obj.to_parquet(path, index=False)
                elif isinstance(obj, bytes):
                    path.write_bytes(obj)
                else:
                    path.write_text(str(obj))
                self.client.log_artifact(run_id, str(path))

    def get_run(self, run_id: str):
        """The run, or a one-line error naming the id and the store."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:
            raise ConfigError(f"no run {run_id!r} in the tracking store {redact(self.uri)}") from None

    def load_trial(self, run_id: str):
        """A finished trial's run, resolved config (flat keys) and trained weights, from the tracking store."""
        import torch
        from mlflow.exceptions import MlflowException

        run = self.get_run(run_id)
        with tempfile.TemporaryDirectory() as d:
            try:
                config = yaml.safe_load(Path(self.client.download_artifacts(run_id, CONFIG, d)).read_text())
                weights = torch.load(self.client.download_artifacts(run_id, WEIGHTS, d), map_location="cpu",
                                     weights_only=True)
            except (MlflowException, OSError):
                raise ConfigError(f"run {run_id} has no trained model ({CONFIG} and {WEIGHTS} artifacts); only "
                                  f"trials that finished training have one (its status: {run.info.status})") from None
        return run, config, weights

    def fail(self, run_id: str, reason: str) -> None:
        self.client.set_tag(run_id, TAG_FAIL, reason[:5000])
        self.client.set_terminated(run_id, "FAILED")

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status


def write_config(cfg, folder: Path) -> Path:
    """The trial's resolved config as `config.yaml` in `folder` (logged as an artifact, read by `load_trial`)."""
    path = Path(folder) / CONFIG
    # libyaml's dumper where PyYAML has it: the same YAML, in a quarter of the pure-Python dumper's time.
    path.write_text(yaml.dump(cfg.to_flat(), Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False))
    return path


def final_files(final, folder: Path) -> list[Path]:
    """A trial's result artifacts written into `folder`: the frontier, the cost card, the method's tables and the
    trained weights."""
    folder = Path(folder)
    final.frontier.to_parquet(folder / FRONTIER, index=False)
    (folder / COST).write_text(json.dumps(final.cost.to_dict(), indent=1))
    for name, table in final.tables.items():
        table.to_parquet(folder / f"{name}.parquet", index=False)
    if final.weights is not None:
        import torch

        torch.save(final.weights, folder / WEIGHTS)
    return sorted(folder.iterdir())


def final_metrics(final) -> dict[str, float]:
    """The metrics a trial logs at its end (a `trainables.loop.FinalResult`): operating point, per-exit accuracy
    and cumulative MACs, exit fractions, and the method's own (gate rates, heads)."""
    metrics = {"val_acc": final.val_acc, "test_acc": final.test_acc, "macs": final.macs,
               "test_macs": final.test_macs, "macs_full": final.cost.total, **final.metrics}
    for k, m in enumerate(final.cost.exits):
        metrics[f"macs_exit_{k}"] = m
        metrics[f"val_acc_exit_{k}"] = final.exit_val_acc[k]
        metrics[f"test_acc_exit_{k}"] = final.exit_test_acc[k]
        metrics[f"exit_fraction_{k}"] = final.val_exit_fractions[k]
    return metrics


def node_name() -> str:
    """Which machine a run ran on: the Ray node address where there is one, else the host name."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:
        pass
    return socket.gethostname()


def _param_str(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    return str(v)

