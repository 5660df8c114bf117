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
"""

from __future__ import annotations

import time

import optuna
from ray.tune.search.optuna import OptunaSearch

from study.search import OBJECTIVES_ATTR


LOST_REASON = "asked for after the sweep's last saved state; lost when its driver stopped (dynastudy resume)"


class StudySearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED for early-stopped trials and FAIL for diverged ones."""

    def __init__(self, *args, sweep_run_id: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sweep_run_id = sweep_run_id
        self.started = time.time()  # pickled with the searcher: `fail_orphans` reads it in the resumed sweep
        self.seconds = {"suggest": 0.0, "tell": 0.0}  # time spent in Optuna (the sweep run logs it)

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

    def _spent(self, what: str, t0: float) -> None:
        seconds = getattr(self, "seconds", None) or {"suggest": 0.0, "tell": 0.0}  # a searcher pickled before
        seconds[what] += time.perf_counter() - t0
        self.seconds = seconds

    def _suggest(self, trial_id: str):
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and params is not None and self.sweep_run_id:
            ot_trial.set_user_attr("sweep_run_id", self.sweep_run_id)
            ot_trial.set_user_attr("tune_trial_id", trial_id)
        return params

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.restored = True
        self.fail_orphans()

    def fail_orphans(self) -> int:
        """Tell FAIL for this sweep's Optuna trials still RUNNING that this searcher does not know (asked after
        its state was saved). Returns how many. A trial is this sweep's by its mark, or, when the driver died
        between asking for it and marking it (right after a trial ended, Tune asks at once), by having started
        unmarked while this sweep ran."""
        known = {t.number for t in self._ot_trials.values()}
        closed = 0
        for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            mark = t.user_attrs.get("sweep_run_id")
            ours = mark == self.sweep_run_id or (mark is None and t.datetime_start is not None and
                                                 t.datetime_start.timestamp() >= getattr(self, "started", 0))
            if t.number in known or not ours:
                continue
            self._ot_study._storage.set_trial_user_attr(t._trial_id, "fail_reason", LOST_REASON)
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
        so the Optuna study keeps no RUNNING trial. Returns how many."""
        closed = 0
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
