"""Run a sweep: validate everything, load the data once, then Ray Tune trials proposed by Optuna, logged to MLflow.

The only module that imports `ray.tune.Tuner`. Order matters: every check that can fail on user input (keys,
ranges, methods, data source, tracking URI, storage URL, study directions) runs before anything is started or
written, so bad input costs nothing. Then the dataset is decoded or read from cache once and handed to every
trial through Ray's object store (`tune.with_parameters`), an MLflow parent run opens for this invocation, and
Tune runs the trials with `StudySearch` (Optuna, study kept in its RDB storage so it outlives the process).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

import optuna

from study import paths
from study.search import (METRICS, MODES, SAMPLERS, SCHEDULERS, SweepSpace, choice_applies, for_method, is_fixed,
                          make_sampler)
from study.tracking import TAG_FAIL, TAG_PARENT, TAG_STOPPED, Tracker, check_reachable, redact
from trainables import data as data_lib
from trainables.config import TrialConfig
from trainables.hparams import ConfigError
from trainables.loop import RunContext
from trainables.methods import get_method

ASHA_MAX_T = 100_000  # reports; above any trial's (epochs, or pruning levels + 1)


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    study: str
    methods: tuple[str, ...]
    trials: int
    fixed: dict[str, Any]  # flat config keys fixed for every trial (never searched)
    results_dir: Path
    tracking_uri: str
    storage: str
    data_dir: str | None = None
    concurrency: int = 2
    sampler: str = "tpe"
    scheduler: str = "fifo"
    seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    ray_address: str | None = None
    choices: dict[str, tuple] = dataclasses.field(default_factory=dict)  # keys searched over the user's values

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("fixed", "choices")}
        out["methods"] = ",".join(self.methods)
        out["storage"], out["tracking_uri"] = redact(self.storage), redact(self.tracking_uri)  # logged as params
        out.update({f"fixed.{k}": v for k, v in self.fixed.items()})
        out.update({f"choice.{k}": ",".join(map(str, v)) for k, v in self.choices.items()})
        return out


@dataclasses.dataclass
class TrialOutcome:
    trial_id: str
    method: str
    status: str  # complete | stopped | diverged | error
    val_acc: float | None
    macs: float | None
    seconds: float
    run_id: str | None


@dataclasses.dataclass
class SweepResult:
    parent_run_id: str
    outcomes: list[TrialOutcome]
    seconds: float
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


# ------------------------------------------------------------------------------------------------ validation

def check_study_name(name: str) -> None:
    if not name or len(name) > 200 or any(c in name for c in "/\\'\"\n"):
        raise ConfigError(f"study name {name!r} is not valid (1-200 characters, no quotes, slashes or newlines)")


def check_storage(url: str, directions: list[str], study: str) -> int:
    """The Optuna storage URL parses and answers; an existing study has our directions.
    Returns how many trials the study already holds (0 when it does not exist yet). Writes nothing."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"storage {url!r} is not a database URL (e.g. sqlite:////abs/optuna.db, "
                          "postgresql://user@host:port/db)") from None
    if parsed.drivername.startswith("sqlite"):
        db = parsed.database or ""
        if not db.startswith("/"):
            raise ConfigError(f"storage {url!r} must name an absolute path (sqlite:////abs/optuna.db)")
        if not Path(db).exists():
            return 0
    try:
        storage = optuna.storages.RDBStorage(url, skip_compatibility_check=False)
        existing = {s.study_name: s for s in storage.get_all_studies()}
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise ConfigError(f"storage {redact(url)} is unreachable ({type(e).__name__}: {first})") from None
    if study not in existing:
        return 0
    have = [d.name.lower() for d in existing[study].directions]
    want = ["maximize" if m == "max" else "minimize" for m in directions]
    if have != want:
        raise ConfigError(f"Optuna study {study!r} in {redact(url)} has directions {have}, not {want}")
    return len(storage.get_all_trials(storage.get_study_id_from_name(study), deepcopy=False))


def fixed_for(method: str, fixed: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """The fixed keys that apply to `method` (see `study.search.for_method`)."""
    return for_method(method, fixed, methods)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What validation learnt: configurations drawn from the space, and the study's existing trial count."""

    probes: list[TrialConfig]
    existing_trials: int


def probe_configs(spec: SweepSpec, draws_per_method: int = 8) -> list[TrialConfig]:
    """Random draws of the sweep's space completed by its fixed keys: all must be valid configs."""
    space = SweepSpace(spec.methods, spec.fixed, spec.choices)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize", "minimize"])
    configs = []
    for key, values in spec.choices.items():  # every value of every choice first, not only those the draws hit
        for value in values:
            for method in spec.methods:
                if not choice_applies(key, method, spec.methods):
                    continue
                fixed = {**fixed_for(method, spec.fixed, spec.methods), "method": method,
                         key.rpartition(":")[2]: value}
                try:  # through the space, which may complete the value (sdn: backbone=vgg sets its depth)
                    constants = SweepSpace([method], fixed)(probe.ask())
                    configs.append(TrialConfig.from_flat({**fixed, **constants}))
                except ConfigError as e:
                    raise ConfigError(f"--choice {key}={value!r} with method {method}: {e}") from None
                except Exception:  # a space that cannot use the value: the value alone says why
                    try:
                        TrialConfig.from_flat(fixed)
                    except ConfigError as e:
                        raise ConfigError(f"--choice {key}={value!r} with method {method}: {e}") from None
                    raise
    for _ in range(draws_per_method * len(spec.methods)):
        trial = probe.ask()
        try:
            constants = space(trial)
        except Exception:
            # A space may compute with a fixed value (a depth's block count) and fail on a bad one: the fixed keys
            # alone then name the bad value; if they parse, the failure is the space's own.
            for method in spec.methods:
                TrialConfig.from_flat({**fixed_for(method, spec.fixed, spec.methods), "method": method})
            raise
        fixed = fixed_for(constants["method"], spec.fixed, spec.methods)
        configs.append(TrialConfig.from_flat({**fixed, **constants}))
    return configs


def validate(spec: SweepSpec) -> Plan:
    """Every check that can fail on user input; writes nothing."""
    check_study_name(spec.study)
    if spec.trials < 1:
        raise ConfigError(f"--trials={spec.trials} must be at least 1")
    if spec.concurrency < 1:
        raise ConfigError(f"--concurrency={spec.concurrency} must be at least 1")
    if spec.max_failures < 0:
        raise ConfigError(f"--max-failures={spec.max_failures} must be 0 or more")
    if spec.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {spec.sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    if spec.scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {spec.scheduler!r}; valid schedulers: {', '.join(SCHEDULERS)}")
    if spec.cpus_per_trial <= 0 or spec.gpus_per_trial < 0:
        raise ConfigError(f"--cpus-per-trial={spec.cpus_per_trial} must be > 0 and "
                          f"--gpus-per-trial={spec.gpus_per_trial} >= 0")
    if not spec.ray_address:  # a local Ray has this machine's resources only: Tune would wait forever
        import torch

        cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
        if spec.cpus_per_trial > cpus:
            raise ConfigError(f"--cpus-per-trial={spec.cpus_per_trial} is more than this machine's {cpus} CPUs")
        if spec.gpus_per_trial > gpus:
            raise ConfigError(f"--gpus-per-trial={spec.gpus_per_trial} is more than this machine's {gpus} GPUs")
    if not spec.methods:
        raise ConfigError("no --method given")
    for m in spec.methods:
        get_method(m)
    fixed_method = spec.fixed.get("method")
    if fixed_method is not None and fixed_method not in spec.methods:
        raise ConfigError(f"the config fixes method={fixed_method}, which is not among --method {list(spec.methods)}")
    for key in [*spec.fixed, *spec.choices]:
        target, sep, _ = key.rpartition(":")
        if sep and target not in spec.methods:
            raise ConfigError(f"{key!r} is for method {target!r}, which is not among --method {list(spec.methods)}")
    for key, values in spec.choices.items():
        if key in ("method", "seed"):
            raise ConfigError(f"--choice {key}=... is not searchable: give several --method flags for methods, "
                              "and --set seed=N for a seed")
        plain = key.rpartition(":")[2]
        for m in (m for m in spec.methods if choice_applies(key, m, spec.methods)):
            fixed = fixed_for(m, spec.fixed, spec.methods)
            if is_fixed(plain, fixed) or any(k.startswith(plain + ".") for k in fixed):
                raise ConfigError(f"--choice {key} is also fixed (--set/--config): a key is either fixed or "
                                  "searched")
        repeated = sorted({repr(v) for v in values if list(values).count(v) > 1})
        if not values or repeated:
            raise ConfigError(f"--choice {key} needs one or more distinct values; got {list(values)}"
                              + (f" ({', '.join(repeated)} repeated)" if repeated else ""))
        if not any(choice_applies(key, m, spec.methods) for m in spec.methods):
            keys = sorted({k for m in spec.methods for k in TrialConfig.valid_keys(m) if k.startswith("model.")})
            raise ConfigError(f"--choice {key}: no method of {list(spec.methods)} has this key; their model keys: "
                              + ", ".join(keys))
    probes = probe_configs(spec)
    datasets = {c.data.dataset for c in probes}
    if len(datasets) > 1:  # the data is loaded once and shared by every trial
        raise ConfigError(f"one sweep trains on one dataset, got {sorted(datasets)}")
    data_lib.check_source(datasets.pop(), spec.data_dir)
    check_reachable(spec.tracking_uri)
    return Plan(probes, check_storage(spec.storage, MODES, spec.study))


# ------------------------------------------------------------------------------------------------ progress

def _progress_callback(tracker: Tracker, total: int, out: TextIO, outcomes: list[TrialOutcome]):
    from ray.tune import Callback

    class Progress(Callback):
        """One line per finished trial; also closes the MLflow run of a trial Tune stopped or lost."""

        def _record(self, trial, status: str) -> None:
            r = trial.last_result or {}
            run_id = r.get("mlflow_run_id")
            if status == "complete" and r.get("diverged"):
                status = "diverged"
            elif status == "complete" and not r.get("final"):
                status = "stopped"
            # Tune may end a trial right after its last report (a scheduler's stop, even at the final epoch),
            # before the trainable closes its run: close it here, whatever happened.
            if run_id and tracker.status(run_id) == "RUNNING":
                if status == "stopped":
                    tracker.client.set_tag(run_id, TAG_STOPPED, f"after epoch {r.get('epoch')}")
                if status == "error":
                    tracker.fail(run_id, f"trial {trial.trial_id} failed: {trial.error_file or 'see the Ray log'}")
                else:
                    tracker.finish(run_id)
            o = TrialOutcome(trial.trial_id, str(r.get("method", trial.config.get("method", "?"))), status,
                             r.get("val_acc"), r.get("macs"), float(r.get("time_total_s", 0.0)), run_id)
            outcomes.append(o)
            acc = f"val_acc={o.val_acc:.4f}" if o.val_acc is not None else "val_acc=-"
            macs = f"macs={o.macs / 1e6:.2f}M" if o.macs is not None else "macs=-"
            extra = f"  ({r.get('fail_reason')})" if status == "diverged" else ""
            if r.get("notes"):
                extra += f"\n    note: {r['notes']}"
            print(f"[{len(outcomes)}/{total}] trial {o.trial_id} {o.method:<8} {status:<8} {acc} {macs} "
                  f"time={o.seconds:.0f}s{extra}", file=out, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._record(trial, "complete")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._record(trial, "error")

    return Progress()


# ------------------------------------------------------------------------------------------------ the sweep

def _local_ray_env() -> None:
    """A plain local ray.init() binds its services to the machine's outward address. With this setting (read
    once, when Ray is imported) a single local node uses 127.0.0.1 for everything."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            print("warning: Ray was imported before dynastudy could bind it to loopback; the local Ray may listen "
                  "on all addresses", file=sys.stderr)


def init_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to `address`, or start a local Ray bound to loopback. Returns whether we started one."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        return False
    # The token-authentication notice on every local start says nothing actionable.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    return True


def run_sweep(spec: SweepSpec, out: TextIO | None = None) -> SweepResult:
    out = out or sys.stdout  # looked up per call: sys.stdout may have been replaced since import
    plan = validate(spec)
    if not spec.ray_address:
        _local_ray_env()
    import ray
    from ray import tune

    from study.searcher import StudySearch
    from trainables.tune_adapter import TrialEnv, trainable

    t0 = time.time()
    for url in (spec.tracking_uri, spec.storage):  # validated: now the folders of SQLite files may be made
        if (db := paths.sqlite_file(url)) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
    cfg0 = plan.probes[0]
    print(f"loading {cfg0.data.dataset} ...", file=out, flush=True)
    arrays = data_lib.load_dataset(cfg0.data.dataset, spec.data_dir, paths.cache_dir(spec.results_dir),
                                   cfg0.data.image_size)
    for data_hp in {c.data for c in plan.probes}:  # sizes (val_size, subset) fit this dataset: fail here, not per trial
        data_lib.make_splits(arrays, data_hp)
    if plan.existing_trials:
        print(f"study {spec.study} already has {plan.existing_trials} trials: adding {spec.trials}", file=out)

    tracker = Tracker(spec.tracking_uri)
    exp_id = tracker.ensure_experiment(spec.study, paths.artifacts_dir(spec.results_dir))
    parent = tracker.start_sweep(exp_id, spec.study, spec.summary())
    started = False
    outcomes: list[TrialOutcome] = []
    status = "FAILED"
    searcher = None
    try:
        started = init_ray(spec.ray_address)
        device = "cuda" if spec.gpus_per_trial > 0 else "cpu"
        env = TrialEnv(study=spec.study, fixed={m: fixed_for(m, spec.fixed, spec.methods) for m in spec.methods},
                       tracking_uri=spec.tracking_uri, experiment_id=exp_id, parent_run_id=parent,
                       context=RunContext(device=device, threads=max(1, int(spec.cpus_per_trial))))
        # Offset the sampler seed by the trials already in the study: a second sweep stays reproducible but does
        # not replay the first one's random start-up configurations.
        searcher = StudySearch(space=SweepSpace(spec.methods, spec.fixed, spec.choices), metric=METRICS, mode=MODES,
                               sampler=make_sampler(spec.sampler, spec.seed + plan.existing_trials),
                               storage=optuna.storages.RDBStorage(spec.storage), study_name=spec.study)
        scheduler = None
        if spec.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            # Scalar schedulers cannot rank two objectives: ASHA compares validation accuracy at equal epochs (or
            # pruning levels: a lottery trial reports once per level). max_t only bounds the rungs (1, 2, 4, ...);
            # it must not stop a trial before its own end, and trials of a sweep may have different lengths.
            scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_acc", mode="max",
                                      max_t=ASHA_MAX_T, grace_period=1, reduction_factor=2)
        resources = {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial}
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trainable, env=env, data=arrays), resources),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec.trials,
                                        max_concurrent_trials=spec.concurrency, reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"{spec.study}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(paths.ray_dir(spec.results_dir)), verbose=0,
                callbacks=[_progress_callback(tracker, spec.trials, out, outcomes)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures)),
        )
        tuner.fit()
        # Tune catches Ctrl-C itself and returns: fewer finished trials than asked means an interrupted sweep.
        status = "FINISHED" if len(outcomes) >= spec.trials else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        result = SweepResult(parent, outcomes, time.time() - t0, interrupted=status != "FINISHED")
        _close_leftovers(tracker, exp_id, parent, searcher, status)
        tracker.log_metrics(parent, {"trials_complete": result.count("complete"),
                                     "trials_stopped": result.count("stopped"),
                                     "trials_failed": result.count("error") + result.count("diverged"),
                                     "sweep_time_s": result.seconds}, step=0)
        tracker.finish(parent, status)
        if started:
            ray.shutdown()
    return result


def _close_leftovers(tracker: Tracker, exp_id: str, parent: str, searcher, status: str) -> None:
    """After an interrupted or failed sweep, nothing of it stays RUNNING: trial runs Tune stopped without a
    callback are marked KILLED in MLflow and their Optuna trials FAIL."""
    reason = f"sweep ended ({status}) before the trial finished"
    runs = tracker.client.search_runs([exp_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent}' and "
                                                              "attributes.status = 'RUNNING'")
    for run in runs:
        tracker.client.set_tag(run.info.run_id, TAG_FAIL, reason)
        tracker.finish(run.info.run_id, "KILLED")
    if searcher is not None:
        searcher.close_unfinished(reason)
