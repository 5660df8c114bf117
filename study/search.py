"""Optuna behind Ray Tune: samplers by name, the define-by-run space of a sweep, and a searcher that tells
Optuna what really happened to each trial.

Ray's `OptunaSearch` tells every trial COMPLETE with its last reported values, including trials an ASHA
scheduler stopped after one epoch; in a multi-objective study that pulls the sampler toward configurations that
were never trained to the end (platforms.md section 5, pain point 3). `StudySearch` tells such a trial PRUNED
(its partial values kept as user attributes) and a diverged trial FAIL with its reason, and records the MLflow
run id and config hash on every Optuna trial, so the two stores can be joined.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import optuna
from ray.tune.search.optuna import OptunaSearch

from search_spaces import get_space
from trainables.hparams import ConfigError

SAMPLERS = ("tpe", "nsga2", "random")
METRICS = ["val_acc", "macs"]
MODES = ["max", "min"]

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")


def is_fixed(name: str, fixed: dict[str, Any]) -> bool:
    m = _INDEXED.match(name)
    return name in fixed or (m is not None and m.group(1) in fixed)


class FixedAwareTrial:
    """A trial proxy for search spaces: a key the user fixed returns its fixed value and is not searched."""

    def __init__(self, trial: Any, fixed: dict[str, Any]) -> None:
        self._trial, self._fixed = trial, fixed

    def _suggest(self, kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
        if is_fixed(name, self._fixed):
            m = _INDEXED.match(name)
            if name in self._fixed:
                return self._fixed[name]
            return list(self._fixed[m.group(1)])[int(m.group(2))]
        return getattr(self._trial, f"suggest_{kind}")(name, *args, **kwargs)

    def suggest_float(self, name: str, *args: Any, **kwargs: Any) -> float:
        return self._suggest("float", name, *args, **kwargs)

    def suggest_int(self, name: str, *args: Any, **kwargs: Any) -> int:
        return self._suggest("int", name, *args, **kwargs)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._suggest("categorical", name, choices)


class SweepSpace:
    """The sweep's space: the method first (when several), then that method's space, fixed keys left out.
    A picklable callable, since Tune checkpoints the searcher with it."""

    def __init__(self, methods: Sequence[str], fixed: dict[str, Any]) -> None:
        self.methods, self.fixed = list(methods), dict(fixed)

    def __call__(self, trial: Any) -> dict[str, Any]:
        t = FixedAwareTrial(trial, self.fixed)
        method = self.methods[0] if len(self.methods) == 1 else t.suggest_categorical("method", self.methods)
        constants = get_space(method)(t) or {}
        return {"method": method, **{k: v for k, v in constants.items() if not is_fixed(k, self.fixed)}}


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
