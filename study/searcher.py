"""`StudySearch`: Ray's OptunaSearch, telling Optuna what really happened to each trial (see study/search.py).

Ray's `OptunaSearch` tells every trial COMPLETE with its last reported values, including trials an ASHA
scheduler stopped after one epoch; in a multi-objective study that pulls the sampler toward configurations that
were never trained to the end (platforms.md section 5, pain point 3). `StudySearch` tells such a trial PRUNED
(its partial values kept as user attributes) and a diverged trial FAIL with its reason, and records the MLflow
run id and config hash on every Optuna trial, so the two stores can be joined.
"""

from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch


class StudySearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED for early-stopped trials and FAIL for diverged ones."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
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
