"""`StudySearch`: Ray's OptunaSearch, telling Optuna what really happened to each trial (see study/search.py).

Ray's `OptunaSearch` tells every trial COMPLETE with its last reported values, including trials an ASHA
scheduler stopped after one epoch; in a multi-objective study that pulls the sampler toward configurations that
were never trained to the end (platforms.md section 5, pain point 3). `StudySearch` tells such a trial PRUNED
(its partial values kept as user attributes) and a diverged trial FAIL with its reason, and records the MLflow
run id and config hash on every Optuna trial, so the two stores can be joined.

For `dynastudy resume`: every Optuna trial is marked with its sweep's MLflow run id and its Tune trial id when it
is asked for. Tune restores this searcher from its last saved state; trials asked after that state was saved
are unknown to it and would stay RUNNING in the storage forever, so `restore` tells them FAIL. A trial that
finished after the saved state is run again by Tune (the trainable reports its logged result without
training); telling Optuna about it a second time is a no-op.

Asking ahead (`ask_ahead`, BENCHMARKS.md, platform overhead): Tune asks for a configuration only when a slot has
freed, so each suggestion (0.05-0.1 s of TPE at 1,000 trials on 2 cores) lies between one trial's end and the
next one's start. With asking ahead, the next configuration is asked for in a thread as soon as a trial has
started, and handed over at the next `suggest`. The price is information: that configuration is chosen without
the result of the trial whose end frees its slot, as if one more trial were running. That is not free: on
`nb201` with 100 trials, TPE asked ahead from the start found fronts 2.1 standard errors below plain Optuna's
(BENCHMARKS.md, search quality). So `auto` asks ahead only where it pays and costs little: when an ask costs at
least AHEAD_SHARE of a trial (short tabular trials, not training runs), and once the sampler has the results of
AHEAD_AFTER trials, so the one it does not see is at most 1 % of what it knows.
"""

from __future__ import annotations

import pickle
import threading
import time

import optuna
from ray.tune.search.optuna import OptunaSearch

from study.search import AHEAD_MODES, OBJECTIVES_ATTR


LOST_REASON = "asked for after the sweep's last saved state; lost when its driver stopped (dynastudy resume)"
AHEAD_REASON = "asked for ahead of its slot; the sweep ended before it ran"
# `auto` asks ahead when an ask costs at least AHEAD_SHARE of a trial's duration and the searcher has heard the
# end of AHEAD_AFTER trials: it then gains at least 1 % in trials per hour for at most 1 % of the results unseen.
AHEAD_SHARE = 0.01
AHEAD_AFTER = 100
# An ask ahead starts this long after the `suggest` that set it off, or at once when it is taken: the driver is
# still starting the trial it has just suggested (Tune resets the actor, ~10 ms), and a sampler holding the GIL
# meanwhile makes that hand-over longer (BENCHMARKS.md, platform overhead).
AHEAD_SETTLE_S = 0.025


class _Ahead:
    """One ask running in a thread, after `settle` seconds: `take` starts it at once if it has not started, waits
    for it and returns its Optuna trial (or raises its error)."""

    def __init__(self, ask, settle: float = 0.0) -> None:
        self.trial, self.error, self.seconds = None, None, 0.0
        self._go = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ask, settle), name="optuna-ask-ahead", daemon=True)
        self._thread.start()

    def _run(self, ask, settle: float) -> None:
        self._go.wait(settle)
        t0 = time.perf_counter()
        try:
            self.trial = ask()
        except BaseException as e:  # noqa: BLE001 - raised on the driver thread by `take`
            self.error = e
        self.seconds = time.perf_counter() - t0

    def take(self):
        self._go.set()
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.trial


class StudySearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED for early-stopped trials and FAIL for diverged ones."""

    # Class defaults: a searcher pickled by an earlier version (`dynastudy resume`) lacks these attributes.
    ask_ahead = "off"
    max_asks: int | None = None
    asked_ahead = 0
    ahead_after = AHEAD_AFTER
    _ahead: _Ahead | None = None

    def __init__(self, *args, sweep_run_id: str | None = None, ask_ahead: str = "off",
                 max_asks: int | None = None, **kwargs) -> None:
        if ask_ahead not in AHEAD_MODES:
            raise ValueError(f"ask_ahead {ask_ahead!r} is not valid; valid: {', '.join(AHEAD_MODES)}")
        super().__init__(*args, **kwargs)
        self.sweep_run_id = sweep_run_id
        self.started = time.time()  # pickled with the searcher: `fail_orphans` reads it in the resumed sweep
        # Time spent in Optuna (the sweep run logs it): `suggest` is the driver's wait, `ahead` the asks in the
        # thread (their own cost, off the driver's path).
        self.seconds = {"suggest": 0.0, "tell": 0.0, "ahead": 0.0}
        self.ask_ahead = ask_ahead
        self.max_asks = max_asks  # the sweep's trials: no ask ahead beyond them (it would never run)
        self.asked_ahead = 0  # configurations handed over from an ask ahead
        self._new_costs()

    def _new_costs(self) -> None:
        """What `auto` decides on: when each running trial was asked for, and the asks' and trials' durations."""
        self._asked_at: dict[str, float] = {}
        self._cost = {"asks": 0, "ask_s": 0.0, "trials": 0, "trial_s": 0.0}

    # Tune pickles the searcher (building the Tuner) and saves its __dict__ (`save`): a pending ask is waited
    # for and left out; its Optuna trial stays RUNNING and `fail_orphans` closes it if the sweep is resumed.
    def _state(self) -> dict:
        state = self.__dict__.copy()
        ahead = state.pop("_ahead", None)
        if ahead is not None:
            try:
                state["_ahead_number"] = ahead.take().number
            except Exception:  # noqa: BLE001 - raised again where it is taken; nothing was asked
                pass
        return state

    def __getstate__(self) -> dict:
        return self._state()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "_cost" not in state:
            self._new_costs()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self._state(), f)

    def _setup_study(self, mode) -> None:
        super()._setup_study(mode)
        # What the study's values are (val_acc and MACs, or latency): a later sweep must search the same.
        if OBJECTIVES_ATTR not in self._ot_study.user_attrs:
            self._ot_study.set_user_attr(OBJECTIVES_ATTR, list(self._metric))

    def suggest(self, trial_id: str):
        t0 = time.perf_counter()
        try:
            return self._suggest(trial_id)
        finally:
            self._spent("suggest", t0)

    def _spent(self, what: str, t0: float | None = None, seconds: float | None = None) -> None:
        spent = getattr(self, "seconds", None) or {}  # a searcher pickled before
        spent[what] = spent.get(what, 0.0) + (seconds if seconds is not None else time.perf_counter() - t0)
        self.seconds = spent

    def _suggest(self, trial_id: str):
        ahead = self._take_ahead()
        t0 = time.perf_counter()
        if ahead is not None and trial_id not in self._ot_trials:
            # Its configuration was sampled in the thread: OptunaSearch's define-by-run reads it back.
            self._ot_trials[trial_id] = ahead
            self.asked_ahead += 1
        params = super().suggest(trial_id)
        if ahead is None:
            self._cost_of("ask", time.perf_counter() - t0)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and params is not None and self.sweep_run_id:
            ot_trial.set_user_attr("sweep_run_id", self.sweep_run_id)
            ot_trial.set_user_attr("tune_trial_id", trial_id)
        if params is not None:
            self._asked_at[trial_id] = time.monotonic()
            if self._should_ask_ahead():
                self._ahead = _Ahead(self._ask_one, AHEAD_SETTLE_S)
        return params

    # ------------------------------------------------------------------ asking ahead
    def _ask_one(self):
        ot_trial = self._ot_study.ask()
        try:
            self._suggest_from_define_by_run_func(self._space, ot_trial)  # samples every parameter now
        except Exception as e:  # no Tune trial will ever own it: closed here, the error raised at `suggest`
            ot_trial.set_user_attr("fail_reason", f"asked for ahead; sampling failed: {type(e).__name__}: {e}"[:5000])
            self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.FAIL)
            raise
        return ot_trial

    def _take_ahead(self):
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        try:
            return ahead.take()
        finally:
            self._spent("ahead", seconds=ahead.seconds)
            self._cost_of("ask", ahead.seconds)

    def _cost_of(self, what: str, seconds: float) -> None:
        self._cost[f"{what}s"] += 1
        self._cost[f"{what}_s"] += seconds

    def _should_ask_ahead(self) -> bool:
        limit = self.max_asks
        if self.ask_ahead == "off" or not callable(self._space) or (limit is not None and
                                                                   len(self._ot_trials) >= limit):
            return False
        if self.ask_ahead == "on":
            return True
        cost = self._cost
        if cost["trials"] < max(1, self.ahead_after) or not cost["asks"]:
            return False  # too few results to spare one (or no trial has ended: its duration is unknown)
        return cost["ask_s"] / cost["asks"] >= AHEAD_SHARE * cost["trial_s"] / cost["trials"]

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.restored = True
        if "_cost" not in self.__dict__:
            self._new_costs()
        self._asked_at = {}  # another process's monotonic clock: those trials' durations are unknown here
        self._ahead = None
        self.fail_orphans()

    def fail_orphans(self) -> int:
        """Tell FAIL for this sweep's Optuna trials still RUNNING that this searcher does not know (asked after
        its state was saved). Returns how many. A trial is this sweep's by its mark, or, when the driver died
        between asking for it and marking it (right after a trial ended, Tune asks at once), by having started
        unmarked while this sweep ran."""
        known = {t.number for t in self._ot_trials.values()}
        ahead = self.__dict__.pop("_ahead_number", None)  # asked ahead before the state was saved, never run
        closed = 0
        for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            mark = t.user_attrs.get("sweep_run_id")
            ours = mark == self.sweep_run_id or (mark is None and t.datetime_start is not None and
                                                 t.datetime_start.timestamp() >= getattr(self, "started", 0))
            if t.number in known or not ours:
                continue
            self._ot_study._storage.set_trial_user_attr(t._trial_id, "fail_reason",
                                                        AHEAD_REASON if t.number == ahead else LOST_REASON)
            self._ot_study.tell(t.number, None, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            closed += 1
        return closed

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            return self._complete(trial_id, result, error)
        finally:
            self._spent("tell", t0)

    def _complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        asked_at = self._asked_at.pop(trial_id, None)
        if asked_at is not None:
            self._cost_of("trial", time.monotonic() - asked_at)
        ot_trial = self._ot_trials.get(trial_id)
        # Only a resumed sweep re-runs trials, so only it pays for the extra read.
        if getattr(self, "restored", False) and ot_trial is not None and trial_id not in self._completed_trials \
                and self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            # A resumed sweep re-ran a trial that ended after its saved state: Optuna has its result already.
            self._completed_trials.add(trial_id)
            return None
        if ot_trial is None or trial_id in self._completed_trials or not result:
            return super().on_trial_complete(trial_id, result, error)
        for key in ("mlflow_run_id", "config_hash", "method"):
            if key in result:
                ot_trial.set_user_attr(key, result[key])
        state = None
        if result.get("diverged"):
            ot_trial.set_user_attr("fail_reason", str(result.get("fail_reason", "diverged")))
            state = optuna.trial.TrialState.FAIL
        elif not error and not result.get("final"):
            ot_trial.set_user_attr("stopped_at_epoch", int(result.get("epoch", 0)))
            for m in self.metric:
                if m in result:
                    ot_trial.set_user_attr(f"{m}_at_stop", float(result[m]))
            state = optuna.trial.TrialState.PRUNED
        if state is None:
            return super().on_trial_complete(trial_id, result, error)
        self._ot_study.tell(ot_trial, None, state=state)
        self._completed_trials.add(trial_id)

    def close_unfinished(self, reason: str) -> int:
        """Tell FAIL for every trial this searcher proposed and never heard the end of (an interrupted sweep),
        so the Optuna study keeps no RUNNING trial (nor one asked ahead). Returns how many."""
        closed = 0
        try:
            pending = self._take_ahead()
        except Exception:  # noqa: BLE001 - the ask failed; `_ask_one` closed its trial
            pending = None
        if pending is not None:
            pending.set_user_attr("fail_reason", AHEAD_REASON)
            self._ot_study.tell(pending, None, state=optuna.trial.TrialState.FAIL)
            closed += 1
        for trial_id, ot_trial in self._ot_trials.items():
            if trial_id in self._completed_trials:
                continue
            try:
                ot_trial.set_user_attr("fail_reason", reason)
                self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.FAIL)
                closed += 1
            except Exception:  # already finished in the storage
                pass
            self._completed_trials.add(trial_id)
        return closed
