"""`MirroredStorage`: an Optuna storage that serves a sweep's study from memory and writes it to its database
behind the driver.

Tune asks the searcher for the next configuration only when a trial slot frees, so every Optuna call is on the
sweep's critical path. On SQLite a suggestion costs about five times what it costs in memory (1,000 asks and tells
of a sweep's study on this project's 2-core machine, idle, without Ray: 53.8 s on SQLite, 9.4 s in memory; inside
a 1,000-trial sweep with the cores shared, 195 s of a 216 s overhead; BENCHMARKS.md, platform overhead). The
database is still the study's record (resume, queries, optuna-dashboard), so here every read is answered by an
`InMemoryStorage` copy of the study, loaded from the database when the study is opened, and every write is
applied to the copy at once (errors such as telling a finished trial surface synchronously, as before) and queued
for a background thread that applies it to the database in the same order.

One study per storage object, used by one driver: a trial the copy creates gets the next trial number, and the
database gives it the same one as long as nobody else adds trials to that study meanwhile. Another process that
does (a second sweep of the same study at the same time) is noticed and warned about: its trials stay invisible
to this sweep's sampler and the numbers differ; both studies' trials are still all recorded. Concurrent sweeps of
one study belong on a server database, where `study.runner` keeps Optuna's own storage.

The writer waits for a quiet moment: it starts on what is queued only once nothing new has been queued for QUIET_S
(at most MAX_HOLD_S after it could have). The driver queues its writes while it hands a trial slot from one trial
to the next (the tell of the trial that ended, the ask of the next one), and each write is 7-13 ms of SQLAlchemy
holding the GIL: a writer running then made every hand-over about 14 ms longer (31 ms instead of 18 ms at 200
one-second trials, BENCHMARKS.md, platform overhead). A flush does not wait for the quiet.

Pickling (Tune saves its searcher with the study in it) first waits for the queue, then keeps only the URL and
which database trial each copy trial is; unpickling loads the copy again in that order, so the trial objects Tune
pickled keep pointing at the same trials. Writes still queued when the driver is killed are lost, as they would
have been a moment earlier without the queue; `dynastudy resume` already handles trials in that state.
"""

from __future__ import annotations

import atexit
import copy
import datetime
import logging
import queue
import threading
import time
import weakref
from typing import Any, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from study.tracking import redact

log = logging.getLogger(__name__)

RETRY_S = 60.0  # how long a database write is retried (SQLite locked by a reader, a server restarting)
FLUSH_S = 300.0  # how long pickling or closing waits for the queue
# The writer starts once nothing has been queued for QUIET_S (a trial starts some 10 ms after its ask is queued),
# or once it has held back MAX_HOLD_S (a steady stream of writes is written all the same).
QUIET_S = 0.025
MAX_HOLD_S = 1.0


class StorageWriteError(RuntimeError):
    """The database refused a write for longer than RETRY_S: later writes are refused too."""


class MirroredStorage(BaseStorage):
    def __init__(self, url: str, engine_kwargs: dict | None = None) -> None:
        self.url = url
        self._engine_kwargs = engine_kwargs
        self._setup(order=None)

    def _setup(self, order: list[int] | None) -> None:
        self._disk = RDBStorage(self.url, engine_kwargs=self._engine_kwargs)
        self._mem = InMemoryStorage()
        self._study: tuple[int, int, str] | None = None  # (copy id, database id, name)
        self._order = order  # database trial ids in copy-number order, from a pickle; used at the next load
        self._disk_tid: dict[int, int] = {}  # copy trial id -> database trial id
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._warned = False
        self._lock = threading.Lock()
        self._last_put = 0.0  # monotonic time of the last write queued
        self._now = threading.Event()  # set while a flush waits: no holding back
        self.queued = 0  # writes queued, for tests and benchmarks ...
        self.writes = 0  # ... and the database transactions they took (a new trial's writes are folded into one)
        ref = weakref.ref(self)
        atexit.register(lambda: (s := ref()) is not None and s._closing())

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        self.flush()
        order = [self._disk_tid[t._trial_id] for t in self._mem.get_all_trials(self._study[0], deepcopy=False)] \
            if self._study is not None else None
        return {"url": self.url, "engine_kwargs": self._engine_kwargs, "order": order,
                "study": self._study[2] if self._study is not None else None}

    def __setstate__(self, state: dict) -> None:
        self.url, self._engine_kwargs = state["url"], state["engine_kwargs"]
        self._setup(order=state.get("order"))
        if state.get("study") is not None:  # the pickled Study holds its id, and asks for no name again
            self._load(state["study"])

    # ------------------------------------------------------------------ the queue
    def _put(self, op: str, *args: Any) -> None:
        if self._error is not None:
            raise StorageWriteError(f"Optuna storage {redact(self.url)}: an earlier write failed "
                                    f"({self._error}); nothing after it was written")
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="optuna-mirror", daemon=True)
                self._thread.start()
        self._last_put = time.monotonic()
        self.queued += 1
        self._queue.put((op, args))

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            try:
                if batch[0][0] != "stop":
                    self._wait_for_quiet()
                    while True:  # everything queued by now, written together
                        try:
                            batch.append(self._queue.get_nowait())
                        except queue.Empty:
                            break
                stop = any(op == "stop" for op, _ in batch)
                for op, args in _coalesce([item for item in batch if item[0] != "stop"]):
                    if self._error is None:
                        self._apply_retrying(op, args)
                if stop:
                    return
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _wait_for_quiet(self) -> None:
        """Hold back until nothing has been queued for QUIET_S, MAX_HOLD_S at most, unless a flush waits."""
        held = time.monotonic()
        while not self._now.is_set():
            now = time.monotonic()
            left = min(QUIET_S - (now - self._last_put), MAX_HOLD_S - (now - held))
            if left <= 0:
                return
            self._now.wait(left)

    def _apply_retrying(self, op: str, args: tuple) -> None:
        deadline, wait = time.monotonic() + RETRY_S, 0.05
        while True:
            try:
                self._apply(op, args)
                self.writes += 1
                return
            except Exception as e:  # noqa: BLE001 - a locked file or a lost connection: retried, then kept
                if time.monotonic() > deadline:
                    self._error = e
                    log.error("Optuna storage write %s failed for %.0f s: %s", op, RETRY_S, e)
                    return
                time.sleep(wait)
                wait = min(2 * wait, 2.0)

    def _apply(self, op: str, args: tuple) -> None:
        disk, sid = self._disk, self._study[1] if self._study else None
        if op == "create":
            tid, template = args
            if tid in self._disk_tid:  # a retry after the database had taken it
                return
            dtid = disk.create_new_trial(sid, template_trial=template)
            self._disk_tid[tid] = dtid
            if disk.get_trial_number_from_id(dtid) != template.number and not self._warned:
                self._warned = True
                log.warning("another process adds trials to Optuna study %s: this sweep's sampler does not see "
                            "them and its trial numbers differ from the database's (run concurrent sweeps of one "
                            "study on a server database)", self._study[2])
        elif op == "state":  # the database stamps its own completion time, a moment after the copy's
            tid, state, values = args
            disk.set_trial_state_values(self._disk_tid[tid], state, values)
        elif op == "param":
            tid, name, value, dist = args
            disk.set_trial_param(self._disk_tid[tid], name, value, dist)
        elif op == "intermediate":
            tid, step, value = args
            disk.set_trial_intermediate_value(self._disk_tid[tid], step, value)
        elif op == "trial_user":
            disk.set_trial_user_attr(self._disk_tid[args[0]], args[1], args[2])
        elif op == "trial_system":
            disk.set_trial_system_attr(self._disk_tid[args[0]], args[1], args[2])
        elif op == "study_user":
            disk.set_study_user_attr(sid, args[0], args[1])
        elif op == "study_system":
            disk.set_study_system_attr(sid, args[0], args[1])
        else:  # pragma: no cover - a programming error
            raise ValueError(f"unknown operation {op!r}")

    def flush(self, timeout: float = FLUSH_S) -> None:
        """Wait until every queued write is in the database; raises StorageWriteError if one failed."""
        deadline = time.monotonic() + timeout
        self._now.set()
        try:
            while self._queue.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            self._now.clear()
        if self._error is not None:
            raise StorageWriteError(f"Optuna storage {redact(self.url)}: a write failed ({self._error})")
        if self._queue.unfinished_tasks:
            raise StorageWriteError(f"Optuna storage {redact(self.url)}: {self._queue.unfinished_tasks} "
                                    f"writes still queued after {timeout:.0f} s")

    def close(self, timeout: float = FLUSH_S) -> None:
        """Flush, then stop the writer thread."""
        try:
            self.flush(timeout)
        finally:
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(("stop", ()))
                self._thread.join(timeout=5)
            self._thread = None

    def _closing(self) -> None:
        try:
            self.close(30.0)
        except Exception as e:  # noqa: BLE001 - at interpreter exit: say so, do not raise
            log.error("%s", e)

    # ------------------------------------------------------------------ studies
    def _load(self, name: str) -> int:
        """Copy the database's study `name` (with all its trials) into memory; the copy's study id."""
        if self._study is not None:
            if self._study[2] == name:
                return self._study[0]
            raise ValueError(f"MirroredStorage serves one study ({self._study[2]!r}), not also {name!r}")
        dsid = self._disk.get_study_id_from_name(name)  # KeyError if absent
        sid = self._mem.create_new_study(self._disk.get_study_directions(dsid), name)
        for k, v in self._disk.get_study_user_attrs(dsid).items():
            self._mem.set_study_user_attr(sid, k, v)
        for k, v in self._disk.get_study_system_attrs(dsid).items():
            self._mem.set_study_system_attr(sid, k, v)
        trials = {t._trial_id: t for t in self._disk.get_all_trials(dsid, deepcopy=False)}
        order = [d for d in (self._order or []) if d in trials]
        order += sorted(set(trials) - set(order), key=lambda d: trials[d].number)
        for d in order:
            self._disk_tid[self._mem.create_new_trial(sid, template_trial=trials[d])] = d
        self._study, self._order = (sid, dsid, name), None
        return sid

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        # An existing one raises DuplicatedStudyError; create_study(load_if_exists=True) then asks for it by name.
        dsid = self._disk.create_new_study(directions, study_name)
        return self._load(self._disk.get_study_name_from_id(dsid))

    def delete_study(self, study_id: int) -> None:
        self.flush()
        self._disk.delete_study(self._study[1])
        self._mem.delete_study(study_id)
        self._study = None
        self._disk_tid.clear()

    def get_study_id_from_name(self, study_name: str) -> int:
        if self._study is not None and self._study[2] == study_name:
            return self._study[0]
        return self._load(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._mem.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._mem.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._mem.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._mem.get_study_system_attrs(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._mem.set_study_user_attr(study_id, key, value)
        self._put("study_user", key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._mem.set_study_system_attr(study_id, key, value)
        self._put("study_system", key, value)

    def get_all_studies(self) -> list:
        self.flush()
        return self._disk.get_all_studies()

    # ------------------------------------------------------------------ trials
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        tid = self._mem.create_new_trial(study_id, template_trial)
        self._put("create", tid, copy.deepcopy(self._mem.get_trial(tid)))  # the copy's object changes later
        return tid

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        self._mem.set_trial_param(trial_id, param_name, param_value_internal, distribution)
        self._put("param", trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        done = self._mem.set_trial_state_values(trial_id, state, values)
        if done:
            self._put("state", trial_id, state, None if values is None else list(values))
        return done

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._mem.set_trial_intermediate_value(trial_id, step, intermediate_value)
        self._put("intermediate", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._mem.set_trial_user_attr(trial_id, key, value)
        self._put("trial_user", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._mem.set_trial_system_attr(trial_id, key, value)
        self._put("trial_system", trial_id, key, value)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._mem.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._mem.get_trial_number_from_id(trial_id)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._mem.get_trial(trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self._mem.get_all_trials(study_id, deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._mem.get_n_trials(study_id, state)

    def remove_session(self) -> None:
        self._disk.remove_session()


_MERGED = ("param", "trial_user", "trial_system", "intermediate", "state")


def _coalesce(batch: list[tuple[str, tuple]]) -> list[tuple[str, tuple]]:
    """The writes of `batch`, with each new trial's later writes in the batch folded into its creation: the
    database creates it with its parameters, attributes and end in one transaction (Optuna's template trial)
    instead of one per write (a trial's ask and tell are some 14 writes of 7-13 ms each). Creations stay in their
    order, so the database numbers trials as the copy does; a write that cannot be folded (a state other than a
    finished one) ends the folding for its trial, and it and what follows are written as they come."""
    out: list[tuple[str, tuple]] = []
    open_: dict[int, dict[str, Any]] = {}  # copy trial id -> the fields of its creation, still being folded
    for op, args in batch:
        fields = open_.get(args[0]) if op in _MERGED else None
        if op == "state" and fields is not None and not args[1].is_finished():
            del open_[args[0]]
            fields = None
        if fields is None:
            if op == "create":
                t = args[1]
                fields = open_[args[0]] = dict(
                    number=t.number, state=t.state, value=None, values=t.values, datetime_start=t.datetime_start,
                    datetime_complete=t.datetime_complete, params=dict(t.params), distributions=dict(t.distributions),
                    user_attrs=dict(t.user_attrs), system_attrs=dict(t.system_attrs),
                    intermediate_values=dict(t.intermediate_values), trial_id=t._trial_id)
                out.append(("create", (args[0], fields)))
            else:
                out.append((op, args))
            continue
        if op == "param":
            _, name, internal, dist = args
            fields["params"][name] = dist.to_external_repr(internal)
            fields["distributions"][name] = dist
        elif op == "trial_user":
            fields["user_attrs"][args[1]] = args[2]
        elif op == "trial_system":
            fields["system_attrs"][args[1]] = args[2]
        elif op == "intermediate":
            fields["intermediate_values"][args[1]] = args[2]
        else:  # a finished state, stamped now as the database stamps its own
            fields.update(state=args[1], values=args[2], datetime_complete=datetime.datetime.now())
    return [("create", (args[0], FrozenTrial(**args[1]))) if op == "create" else (op, args) for op, args in out]


def mirrors(url: str) -> bool:
    """Whether a sweep's driver serves the study at `url` from memory: for a SQLite file (the local default, one
    driver), not for a server database (several drivers may share a study there)."""
    return url.startswith("sqlite:")


def study_storage(url: str) -> BaseStorage:
    """The Optuna storage a sweep's driver uses for `url` (see `mirrors`)."""
    return MirroredStorage(url) if mirrors(url) else optuna.storages.RDBStorage(url)
