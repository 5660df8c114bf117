"""Run a sweep: validate everything, load the data once, then Ray Tune trials proposed by Optuna, logged to MLflow.

The only module that imports `ray.tune.Tuner`. Order matters: every check that can fail on user input (keys,
ranges, methods, data source, tracking URI, storage URL, study directions) runs before anything is started or
written, so bad input costs nothing. Then the dataset is decoded or read from cache once and handed to every
trial through Ray's object store (`tune.with_parameters`), an MLflow parent run opens for this invocation, and
Tune runs the trials with `StudySearch` (Optuna, study kept in its RDB storage so it outlives the process; on
SQLite served from memory and written behind, `study.storage`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

import optuna

from study import paths
from study.search import (AHEAD_MODES, METRICS, MODES, OBJECTIVES_ATTR, SAMPLERS, SCHEDULERS, SweepSpace,
                          choice_applies, for_method, is_fixed, make_sampler, nsga2_population)
from study.storage import study_storage
from study.tracking import (TAG_FAIL, TAG_KIND, TAG_LOST, TAG_PARENT, TAG_RESUMES, TAG_STOPPED, TAG_TRACKING,
                            TAG_TUNE_PATH, Tracker, check_reachable, redact)
from trainables import data as data_lib
from trainables.config import TrialConfig
from trainables.hparams import ConfigError
from trainables.loop import RunContext
from trainables.methods import get_method

ASHA_MAX_T = 100_000  # reports; above any trial's (epochs, or pruning levels + 1)
SPEC_FILE = "sweep.json"  # artifact of the sweep run: the SweepSpec, for `dynastudy resume`
# Seconds a trial reports of where its time went (trainables/tune_adapter.py), logged as means on the sweep run.
TRIAL_TIMING = ("setup_s", "open_s", "open_wait_s", "final_s", "end_wait_s", "fit_s")


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
    storage_path: str | None = None  # Tune's storage: a shared absolute path or s3://...; None: <results>/ray
    tracking_timeout_s: float = 300.0  # how long the sweep's end waits for an unreachable tracking server
    objective: str = "macs"  # the second objective (minimised) beside val_acc: MACs, or a metric of OBJECTIVES
    compile: bool = False  # trials train through torch.compile (how a trial runs, outside the config hash)
    ask_ahead: str = "auto"  # ask Optuna for the next configuration while trials run (study.searcher): auto|on|off
    population: int | None = None  # NSGA-II's population; None: sized to the trials (study.search.nsga2_population)

    # Where the sweep runs, not what it is: `dynastudy resume` takes these from its own flags.
    SERVICE_FIELDS = ("results_dir", "tracking_uri", "storage", "ray_address")

    def to_json(self) -> dict[str, Any]:
        """The sweep as `dynastudy resume` reads it back (no service URL: those may hold passwords)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.SERVICE_FIELDS}
        out["choices"] = {k: list(v) for k, v in self.choices.items()}
        out["methods"] = list(self.methods)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], **services: Any) -> SweepSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["methods"] = tuple(data["methods"])
        data["choices"] = {k: tuple(v) for k, v in data.get("choices", {}).items()}
        return cls(**data, **services)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("fixed", "choices")}
        out["methods"] = ",".join(self.methods)
        out["storage"], out["tracking_uri"] = redact(self.storage), redact(self.tracking_uri)  # logged as params
        out.update({f"fixed.{k}": v for k, v in self.fixed.items()})
        out.update({f"choice.{k}": ",".join(map(str, v)) for k, v in self.choices.items()})
        if self.sampler == "nsga2":  # the population the sampler runs with, not None
            out["population"] = nsga2_population(self.trials, self.population)
        else:
            del out["population"]
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
    timing: dict[str, float] = dataclasses.field(default_factory=dict)  # TRIAL_TIMING (trainable)


@dataclasses.dataclass
class SweepResult:
    parent_run_id: str
    outcomes: list[TrialOutcome]
    seconds: float
    interrupted: bool = False
    undelivered: int = 0  # MLflow writes kept on disk because the tracking server did not answer
    trials: int = 0  # asked for
    searcher_s: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds in Optuna suggest / tell
    asked_ahead: int = 0  # configurations that came from an ask ahead (study.searcher)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


# ------------------------------------------------------------------------------------------------ validation

def check_study_name(name: str) -> None:
    if not name or len(name) > 200 or any(c in name for c in "/\\'\"\n"):
        raise ConfigError(f"study name {name!r} is not valid (1-200 characters, no quotes, slashes or newlines)")


def check_storage(url: str, directions: list[str], study: str, objectives: list[str] | None = None) -> int:
    """The Optuna storage URL parses and answers; an existing study has our directions and, where it recorded
    them, our objectives (a study of accuracy vs MACs cannot take accuracy vs latency values).
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
    recorded = existing[study].user_attrs.get(OBJECTIVES_ATTR, list(METRICS))
    if objectives is not None and list(recorded) != list(objectives):
        raise ConfigError(f"Optuna study {study!r} in {redact(url)} optimises {recorded}, not {objectives}: use "
                          f"--objective {recorded[1]} or another study")
    return len(storage.get_all_trials(storage.get_study_id_from_name(study), deepcopy=False))


def tune_storage(storage_path: str | None, results_dir: Path):
    """Tune's `storage_path` and pyarrow filesystem. Every node of a cluster must reach it: a shared filesystem
    mounted at the same absolute path everywhere, or S3-compatible storage (`s3://bucket/prefix`; credentials and
    endpoint from the usual AWS_* variables, e.g. AWS_ENDPOINT_URL for MinIO, on every node). Default:
    <results-dir>/ray (one machine). A URL pyarrow cannot open, or an S3 bucket it cannot reach, is a one-line
    error; nothing is written."""
    if not storage_path:
        return str(paths.ray_dir(results_dir)), None
    if "://" not in storage_path:
        if not storage_path.startswith("/"):
            raise ConfigError(f"--storage-path {storage_path!r} must be an absolute path (the same on every node) "
                              "or s3://bucket/prefix")
        return storage_path, None
    scheme = storage_path.split("://", 1)[0]
    if scheme not in ("s3", "gs", "file"):
        raise ConfigError(f"--storage-path {storage_path!r}: scheme {scheme!r} is not supported; valid: an absolute "
                          "path, s3://bucket/prefix (S3 or S3-compatible, e.g. MinIO), gs://bucket/prefix")
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage_path)
        bucket = path.split("/", 1)[0]
        info = fs.get_file_info(bucket)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--storage-path {storage_path!r} is unusable: {first}") from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ConfigError(f"--storage-path {storage_path!r}: bucket {bucket!r} does not exist")
    return path, fs


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
    if spec.population is not None:
        if spec.sampler != "nsga2":
            raise ConfigError(f"--population={spec.population} is NSGA-II's; it needs --sampler nsga2, not "
                              f"{spec.sampler}")
        if spec.population < 2:
            raise ConfigError(f"--population={spec.population} must be at least 2")
    if spec.ask_ahead not in AHEAD_MODES:
        raise ConfigError(f"ask_ahead {spec.ask_ahead!r} is not valid; valid: {', '.join(AHEAD_MODES)}")
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
    check_objective(spec.objective, spec.methods)
    probes = probe_configs(spec)
    datasets = {c.data.dataset for c in probes if not is_tabular(c.method)}
    if len(datasets) > 1:  # the data is loaded once and shared by every trial
        raise ConfigError(f"one sweep trains on one dataset, got {sorted(datasets)}")
    if datasets:
        data_lib.check_source(datasets.pop(), spec.data_dir)
    tune_storage(spec.storage_path, spec.results_dir)
    if spec.tracking_timeout_s < 0:
        raise ConfigError(f"--tracking-timeout={spec.tracking_timeout_s} must be 0 or more seconds")
    check_reachable(spec.tracking_uri)
    return Plan(probes, check_storage(spec.storage, MODES, spec.study, objective_names(spec.objective)))


def is_tabular(method: str) -> bool:
    """Whether `method`'s trials look their results up (NAS-Bench-201) rather than train on a dataset."""
    return bool(getattr(get_method(method), "TABULAR", False))


def check_objective(objective: str, methods: Sequence[str]) -> None:
    """`objective` is MACs or a metric every method of the sweep reports (a method's OBJECTIVES)."""
    if objective == "macs":
        return
    offered = [set(getattr(get_method(m), "OBJECTIVES", {})) for m in methods]
    common = sorted(set.intersection(*offered)) if offered else []
    if objective not in common:
        raise ConfigError(f"--objective {objective!r} is not reported by every method of {list(methods)}; "
                          f"valid: {', '.join(['macs', *common])}")


def objective_names(objective: str) -> list[str]:
    """The metrics an Optuna study of this sweep optimises, in order (stored with the study)."""
    return [METRICS[0], objective]


# ------------------------------------------------------------------------------------------------ progress

def _progress_callback(box, total: int, out: TextIO, outcomes: list[TrialOutcome], ended: dict, done: int = 0):
    """One line per finished trial. Its MLflow writes go through the driver's outbox `box`, so a tracking server
    that is down never stalls Tune's loop: it closes the run of a trial Tune stopped or lost, and takes over what
    an ended trial could not deliver (saved in its last checkpoint)."""
    from ray.tune import Callback

    class Progress(Callback):
        # Arguments, not closure cells: Tune pickles its callbacks with the Tuner, this class included.
        def __init__(self, box, total: int, out: TextIO, outcomes: list[TrialOutcome], ended: dict, done: int):
            self.box, self.total, self.out, self.outcomes, self.ended, self.done = \
                box, total, out, outcomes, ended, done

        def __getstate__(self) -> dict:
            # The outbox and the output stream belong to this process (`dynastudy resume` brings its own).
            return {}

        def _record(self, trial, status: str) -> None:
            box, out, outcomes = self.box, self.out, self.outcomes
            r = trial.last_result or {}
            run_id = r.get("mlflow_run_id")
            if status == "complete" and r.get("diverged"):
                status = "diverged"
            elif status == "complete" and not r.get("final"):
                status = "stopped"
            closed = status == "complete" and r.get("final") and not r.get("tracking_pending")
            if run_id and not closed:  # a trial that delivered its FINISHED status itself needs nothing more
                # Tune may end a trial right after its last report (a scheduler's stop, even at the final epoch),
                # before the trainable closes its run: close it here, unless it has ended meanwhile.
                tags = {TAG_STOPPED: f"after epoch {r.get('epoch')}"} if status == "stopped" else \
                    {TAG_FAIL: f"trial {trial.trial_id} failed: {trial.error_file or 'see the Ray log'}"} \
                    if status == "error" else {}
                box.status(run_id, "FAILED" if status == "error" else "FINISHED", only_if_running=True, tags=tags)
                if r.get("tracking_pending") and trial.checkpoint is not None:
                    with trial.checkpoint.as_directory() as d:
                        box.adopt(Path(d))
                    # Queued after them: it arrives only once they have.
                    box.tag(run_id, TAG_TRACKING, f"{r.get('tracking')}; the sweep's driver delivered them after "
                                                  "the trial ended")
            o = TrialOutcome(trial.trial_id, str(r.get("method", trial.config.get("method", "?"))), status,
                             r.get("val_acc"), r.get("macs"), float(r.get("time_total_s", 0.0)), run_id,
                             {k: float(r[k]) for k in TRIAL_TIMING if k in r})
            outcomes.append(o)
            acc = f"val_acc={o.val_acc:.4f}" if o.val_acc is not None else "val_acc=-"
            macs = f"macs={o.macs / 1e6:.2f}M" if o.macs is not None else "macs=-"
            extra = f"  ({r.get('fail_reason')})" if status == "diverged" else ""
            if r.get("replayed"):
                extra += "  (it had finished before the sweep was interrupted: its logged result, not retrained)"
            if r.get("notes"):
                extra += f"\n    note: {r['notes']}"
            if r.get("tracking"):
                extra += f"\n    tracking: {r['tracking']}" + (
                    "; the sweep delivers the rest" if r.get("tracking_pending") else "")
            print(f"[{self.done + len(outcomes)}/{self.total}] trial {o.trial_id} {o.method:<8} {status:<8} {acc} "
                  f"{macs} time={o.seconds:.0f}s{extra}", file=out, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._record(trial, "complete")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._record(trial, "error")

        def on_experiment_end(self, trials, **info):
            # Also called when Ctrl-C ends the loop: counting the trials that ended tells the two apart (a
            # resumed sweep's list holds the trials that ended before it, too).
            self.ended["trials"] = sum(t.status in ("TERMINATED", "ERROR") for t in trials)

        def on_trial_recover(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            where = f"epoch {r['epoch']}" if r.get("epoch") else "the start (no checkpoint yet)"
            print(f"trial {trial.trial_id} failed (attempt {trial.run_metadata.num_failures}); retrying from "
                  f"{where}", file=self.out, flush=True)

    return Progress(box, total, out, outcomes, ended, done)


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


def _load_data(spec: SweepSpec, plan: Plan, out: TextIO):
    for url in (spec.tracking_uri, spec.storage):  # validated: now the folders of SQLite files may be made
        if (db := paths.sqlite_file(url)) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
    trained = [c for c in plan.probes if not is_tabular(c.method)]
    if not trained:  # tabular methods only: nothing to load
        return None
    cfg0 = trained[0]
    print(f"loading {cfg0.data.dataset} ...", file=out, flush=True)
    arrays = data_lib.load_dataset(cfg0.data.dataset, spec.data_dir, paths.cache_dir(spec.results_dir),
                                   cfg0.data.image_size)
    for data_hp in {c.data for c in trained}:  # sizes (val_size, subset) fit this dataset: fail here, not per trial
        data_lib.make_splits(arrays, data_hp)
    return arrays


def run_sweep(spec: SweepSpec, out: TextIO | None = None) -> SweepResult:
    out = out or sys.stdout  # looked up per call: sys.stdout may have been replaced since import
    plan = validate(spec)
    if not spec.ray_address:
        _local_ray_env()
    from ray import tune

    from study.searcher import StudySearch

    t0 = time.time()
    arrays = _load_data(spec, plan, out)
    if plan.existing_trials:
        print(f"study {spec.study} already has {plan.existing_trials} trials: adding {spec.trials}", file=out)
    tracker = Tracker(spec.tracking_uri)
    exp_id = tracker.ensure_experiment(spec.study, paths.artifacts_dir(spec.results_dir))
    for url in (spec.tracking_uri, spec.storage):
        paths.sqlite_wal(url)
    parent = tracker.start_sweep(exp_id, spec.study, spec.summary())
    name = f"{spec.study}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path, filesystem = tune_storage(spec.storage_path, spec.results_dir)
    # What `dynastudy resume` needs: where Tune keeps this sweep's state, and the sweep itself (no secrets).
    tracker.client.set_tag(parent, TAG_TUNE_PATH, f"{storage_path.rstrip('/')}/{name}")
    tracker.log_artifacts(parent, {SPEC_FILE: json.dumps(spec.to_json(), indent=1)})

    def make_tuner(trainable, callbacks):
        # Offset the sampler seed by the trials already in the study: a second sweep stays reproducible but
        # does not replay the first one's random start-up configurations.
        searcher = StudySearch(space=SweepSpace(spec.methods, spec.fixed, spec.choices),
                               metric=objective_names(spec.objective),
                               mode=MODES, sampler=make_sampler(spec.sampler, spec.seed + plan.existing_trials,
                                                                spec.concurrency, spec.trials, spec.population),
                               storage=study_storage(spec.storage), study_name=spec.study,
                               sweep_run_id=parent, ask_ahead=spec.ask_ahead, max_asks=spec.trials)
        scheduler = None
        if spec.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            # Scalar schedulers cannot rank two objectives: ASHA compares validation accuracy at equal epochs (or
            # pruning levels: a lottery trial reports once per level). max_t only bounds the rungs (1, 2, 4, ...);
            # it must not stop a trial before its own end, and trials of a sweep may have different lengths.
            scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_acc", mode="max",
                                      max_t=ASHA_MAX_T, grace_period=1, reduction_factor=2)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec.trials,
                                        max_concurrent_trials=spec.concurrency, reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=filesystem, verbose=0,
                callbacks=callbacks, checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures)))

    return _drive(spec, arrays, tracker, exp_id, parent, make_tuner, out, t0)


def _drive(spec: SweepSpec, arrays, tracker: Tracker, exp_id: str, parent: str, make_tuner, out: TextIO,
           t0: float, done: int = 0, resumed: bool = False) -> SweepResult:
    """Run (or continue) the sweep's Tuner on Ray; whatever happens, leave nothing of it RUNNING."""
    import ray
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from study.outbox import Outbox
    from trainables.tune_adapter import TrialEnv, bounded_http_retries, trainable

    bounded_http_retries()
    # MLflow is the sweep's record: Tune's own per-trial CSV and TensorBoard files would cost the driver time on
    # every result (benchmarks/sweep_overhead.py); its JSON log stays, Tune's end-of-run summary reads it. A user
    # who wants them all sets the variable to 0.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    box = Outbox(tracker.client)
    started = False
    outcomes: list[TrialOutcome] = []
    status = "FAILED"
    tuner = None
    try:
        started = init_ray(spec.ray_address)
        device = "cuda" if spec.gpus_per_trial > 0 else "cpu"
        env = TrialEnv(study=spec.study, fixed={m: fixed_for(m, spec.fixed, spec.methods) for m in spec.methods},
                       tracking_uri=spec.tracking_uri, experiment_id=exp_id, parent_run_id=parent,
                       context=RunContext(device=device, threads=max(1, int(spec.cpus_per_trial)),
                                          compile=spec.compile), resumed=resumed)
        resources = {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial}
        ended: dict[str, int] = {}
        callbacks = [_progress_callback(box, spec.trials, out, outcomes, ended, done), JsonLoggerCallback()]
        tuner = make_tuner(tune.with_resources(tune.with_parameters(trainable, env=env, data=arrays), resources),
                           callbacks)
        tuner.fit()
        # Tune catches Ctrl-C itself and returns: trials that did not end mean an interrupted sweep.
        status = "FINISHED" if ended.get("trials", 0) >= spec.trials else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        result = SweepResult(parent, outcomes, time.time() - t0, interrupted=status != "FINISHED", trials=spec.trials)
        searcher = _searcher_of(tuner)
        _close_leftovers(tracker, box, exp_id, parent, searcher, status, out)
        flush_s = _flush_study(searcher, out)
        # Where the time went (benchmarks/sweep_overhead.py): Optuna's suggest and tell on this driver, and per
        # trial the opening of its MLflow run (and the trial's wait for it), the wait for its writes at its end,
        # and its whole `fit`.
        result.searcher_s = dict(getattr(searcher, "seconds", {}))
        result.asked_ahead = getattr(searcher, "asked_ahead", 0)
        timing = {f"optuna_{k}_s": v for k, v in result.searcher_s.items()}
        if flush_s is not None:
            timing["optuna_flush_s"] = flush_s  # the end's wait for Optuna writes still queued (study.storage)
            storage = searcher._storage  # a MirroredStorage: how many writes, in how many database transactions
            timing.update(optuna_writes_queued=storage.queued, optuna_db_transactions=storage.writes)
        timed = [o.timing for o in outcomes if o.timing]
        for k in TRIAL_TIMING if timed else ():
            timing[f"trial_{k}_mean"] = sum(t.get(k, 0.0) for t in timed) / len(timed)
        box.metrics(parent, {"trials_complete": result.count("complete"), "trials_stopped": result.count("stopped"),
                             "trials_failed": result.count("error") + result.count("diverged"),
                             "trials_asked_ahead": result.asked_ahead,
                             "sweep_time_s": result.seconds, **timing}, step=done)
        box.status(parent, status)
        result.undelivered = _deliver(box, spec, parent, out)
        if started:
            ray.shutdown()
    return result


def _flush_study(searcher, out: TextIO) -> float | None:
    """Wait for the Optuna writes a mirrored study still has queued (study.storage); the seconds it took, None
    when the study is not mirrored. A write the database refused is reported, not raised: MLflow has the trials."""
    from study.storage import MirroredStorage, StorageWriteError

    storage = getattr(searcher, "_storage", None)
    if not isinstance(storage, MirroredStorage):
        return None
    t0 = time.perf_counter()
    try:
        storage.close()
    except StorageWriteError as e:
        print(f"optuna: {e}", file=out, flush=True)
    return time.perf_counter() - t0


def _searcher_of(tuner):
    """The StudySearch a Tuner runs with (after `Tuner.restore`, the one Tune restored), if any."""
    try:
        return tuner._local_tuner._tune_config.search_alg if tuner is not None else None
    except AttributeError:
        return None


def _deliver(box, spec: SweepSpec, parent: str, out: TextIO) -> int:
    """Wait for the driver's MLflow writes; what cannot arrive within `spec.tracking_timeout_s` is saved under the
    results folder for `dynastudy resume` to deliver. Returns how many operations were left."""
    left = box.flush(spec.tracking_timeout_s)
    if box.delayed:
        print(f"tracking: {box.summary()}", file=out, flush=True)
    if not left:
        box.close(timeout=1)
        return 0
    box.close(timeout=5)
    folder = paths.undelivered_dir(spec.results_dir) / parent
    folder.mkdir(parents=True, exist_ok=True)
    box.save(folder)
    print(f"tracking: {left} MLflow writes could not reach {redact(spec.tracking_uri)} within "
          f"{spec.tracking_timeout_s:g} s ({box.last_error}); they are kept in {folder}: `dynastudy resume "
          f"--study {spec.study}` delivers them once the server answers", file=sys.stderr, flush=True)
    return left


def _close_leftovers(tracker: Tracker, box, exp_id: str, parent: str, searcher, status: str, out: TextIO) -> None:
    """After an interrupted or failed sweep, nothing of it stays RUNNING: trial runs Tune stopped without a
    callback (or lost) are marked KILLED in MLflow and their Optuna trials FAIL."""
    reason = f"sweep ended ({status}) before the trial finished"
    if searcher is not None:
        searcher.close_unfinished(reason)
    box.flush(5.0)  # the trials' closing writes queued by the progress callback go first
    try:
        runs = tracker.search_all(exp_id, f"tags.`{TAG_PARENT}` = '{parent}' and attributes.status = 'RUNNING'")
    except Exception as e:  # the tracking server is down: `dynastudy resume` looks again
        print(f"tracking: could not look for unfinished trial runs ({type(e).__name__})", file=out)
        return
    for run in runs:
        tags = {TAG_FAIL: reason}
        if status == "FINISHED":  # every Tune trial has ended: a run still open belongs to none of them
            tags[TAG_LOST] = "its trial was lost when the sweep's driver stopped"
        box.status(run.info.run_id, "KILLED", only_if_running=True, tags=tags)


# ------------------------------------------------------------------------------------------------ resume

def deliver_saved(tracker: Tracker, results_dir: Path, timeout_s: float, out: TextIO) -> int:
    """Deliver the MLflow writes earlier sweeps kept on disk (`_deliver`); a folder goes once all of it arrived.
    Returns how many operations arrived."""
    import shutil

    from study.outbox import Outbox

    root = paths.undelivered_dir(results_dir)
    arrived = 0
    for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        box = Outbox(tracker.client)
        queued = box.adopt(folder)
        left = box.flush(timeout_s)
        box.close(timeout=5)
        arrived += queued - left
        if left:
            print(f"tracking: {left} of {queued} saved MLflow writes in {folder} still cannot be delivered "
                  f"({box.last_error})", file=out, flush=True)
        else:
            shutil.rmtree(folder)
            print(f"tracking: delivered {queued} MLflow writes saved by sweep run {folder.name}", file=out, flush=True)
    return arrived


def resume_sweep(study: str, tracking_uri: str, storage: str, results_dir: Path, ray_address: str | None = None,
                 data_dir: str | None = None, out: TextIO | None = None) -> SweepResult | None:
    """Continue the study's latest sweep that did not finish (its driver killed or interrupted): Tune restores
    the trials from its saved state (finished ones are not run again, interrupted ones continue from their
    checkpoints), Optuna keeps its history in `storage`, and the trials log to the same MLflow runs under the
    same sweep run, which is closed at the end. Writes saved while the tracking server was down are delivered
    first. Returns None when there was only that to do."""
    from study.tracking import check_readable

    out = out or sys.stdout
    check_study_name(study)
    check_readable(tracking_uri)
    tracker = Tracker(tracking_uri)
    exp_id = tracker.experiment_id(study)
    if exp_id is None:
        known = ", ".join(tracker.studies()) or "none"
        raise ConfigError(f"no study {study!r} in {redact(tracking_uri)} (studies there: {known})")
    t0 = time.time()
    delivered = deliver_saved(tracker, results_dir, 60.0, out)
    sweeps = tracker.client.search_runs([exp_id], filter_string=f"tags.`{TAG_KIND}` = 'sweep'",
                                        order_by=["attributes.start_time DESC"])
    target = next((r for r in sweeps if r.info.status != "FINISHED"), None)
    if target is None:
        if delivered:
            return None
        raise ConfigError(f"study {study!r} has no interrupted sweep to resume: its {len(sweeps)} sweeps all "
                          "FINISHED")
    parent = target.info.run_id
    tags, params = target.data.tags, target.data.params
    if TAG_TUNE_PATH not in tags:
        raise ConfigError(f"sweep run {parent} of study {study!r} predates resumable sweeps (no "
                          f"{TAG_TUNE_PATH} tag); start a new sweep of the study instead")
    if params.get("storage") not in (None, redact(storage)):
        raise ConfigError(f"sweep run {parent} kept its Optuna study in {params['storage']}, not {redact(storage)}: "
                          "pass the same --storage")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        spec_json = json.loads(Path(tracker.client.download_artifacts(parent, SPEC_FILE, d)).read_text())
    spec = SweepSpec.from_json(spec_json, results_dir=results_dir, tracking_uri=tracking_uri, storage=storage,
                               ray_address=ray_address)
    spec = dataclasses.replace(spec, data_dir=data_dir or spec.data_dir or os.environ.get("DYNASTUDY_DATA"))
    if not spec.ray_address:
        _local_ray_env()
    from ray import tune

    path = tags[TAG_TUNE_PATH]
    _, filesystem = tune_storage(spec.storage_path, spec.results_dir)
    if not tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        raise ConfigError(f"Tune's state of sweep run {parent} is not at {path}: pass the --results-dir (or "
                          "--storage-path) that sweep used")
    plan = validate(spec)
    arrays = _load_data(spec, plan, out)
    # Paged: a sweep of thousands of trials has more ended runs than one search returns.
    ended = tracker.search_all(exp_id, f"tags.`{TAG_PARENT}` = '{parent}' and attributes.status != 'RUNNING'")
    done = sum(TAG_LOST not in r.data.tags for r in ended)
    resumes = int(tags.get(TAG_RESUMES, "0")) + 1
    print(f"resuming sweep run {parent} of study {study} ({done} of {spec.trials} trials had ended; Tune's state "
          f"in {path})", file=out, flush=True)
    tracker.client.update_run(parent, status="RUNNING")
    tracker.client.set_tag(parent, TAG_RESUMES, str(resumes))

    def make_tuner(trainable, callbacks):
        # Finished trials stay finished; trials that were running continue from their last checkpoints; trials
        # that had failed for good are not retried again.
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   storage_filesystem=filesystem)
        # Tune restores the callbacks pickled with the first Tuner, with that process's outbox and output: ours
        # replace them (Tune offers no public way; `Tuner.restore` takes no RunConfig).
        tuner._local_tuner._run_config.callbacks = callbacks
        return tuner

    return _drive(spec, arrays, tracker, exp_id, parent, make_tuner, out, t0, done, resumed=True)
