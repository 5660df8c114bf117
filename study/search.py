"""Optuna behind Ray Tune: samplers by name and the define-by-run space of a sweep. No Ray import here
(see `study/searcher.py`), so the runner can set Ray's environment before Ray is first imported.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Sequence

import optuna

from search_spaces import get_space
from trainables.hparams import ConfigError

SAMPLERS = ("tpe", "nsga2", "random")
SCHEDULERS = ("fifo", "asha")  # Tune trial schedulers (study/runner.py builds them)
AHEAD_MODES = ("auto", "on", "off")  # asking Optuna ahead of a free trial slot (study/searcher.py)
METRICS = ["val_acc", "macs"]  # a sweep's objectives by default; `--objective` may replace macs (study/runner.py)
MODES = ["max", "min"]
OBJECTIVES_ATTR = "dynastudy.objectives"  # Optuna study user attribute: the metrics its values are

# NSGA-II's population by default: a tenth of the sweep's trials (ten generations), within [4, Optuna's 50].
# Optuna's fixed 50 makes a 100-trial sweep two generations, the first of them random, and measured on NAS-Bench-201
# that is no better than random search; 10 beats it by 3.6 standard errors (BENCHMARKS.md, search quality).
NSGA2_GENERATIONS, NSGA2_MIN_POPULATION, NSGA2_MAX_POPULATION = 10, 4, 50

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


def nsga2_population(trials: int, population: int | None = None) -> int:
    """NSGA-II's population for a sweep of `trials` trials: `population` when the user gave one."""
    if population is not None:
        return population
    return max(NSGA2_MIN_POPULATION, min(NSGA2_MAX_POPULATION, trials // NSGA2_GENERATIONS))


def make_sampler(name: str, seed: int | None, concurrency: int = 1, trials: int | None = None,
                 population: int | None = None) -> optuna.samplers.BaseSampler:
    """The sampler `name` for a sweep of `trials` trials. With trials running in parallel, TPE treats the running
    ones as bad results of their configurations (`constant_liar`), so parallel suggestions spread out instead of
    repeating what is already running; sequentially it is plain TPE (benchmarks/search_quality.py measures both).
    NSGA-II's population is `population`, else sized to the budget (`nsga2_population`); Optuna's 50 without one."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=concurrency > 1)
    if name == "nsga2":
        if population is None and trials is None:
            return NSGAIISampler(seed=seed)
        return NSGAIISampler(seed=seed, population_size=nsga2_population(trials or 0, population))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")


_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, picklable: Tune saves the searcher, sampler included, with the sweep's state, and from
    Optuna 5.1 the sampler holds a thread lock, which pickle refuses. The lock is left out and made anew."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        locks = [k for k, v in state.items() if isinstance(v, _LOCK_TYPES)]
        for k in locks:
            state[k] = type(state[k]) is type(threading.RLock())
        state["_dynastudy_locks"] = locks
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        locks = state.pop("_dynastudy_locks", [])
        self.__dict__.update(state)
        for k in locks:
            setattr(self, k, threading.RLock() if state[k] else threading.Lock())


def is_fixed(name: str, fixed: dict[str, Any]) -> bool:
    m = _INDEXED.match(name)
    return name in fixed or (m is not None and m.group(1) in fixed)


def param_name(method: str, key: str, choices: Sequence[Any] | None = None) -> str:
    """The Optuna name of config key `key` for `method`. Optuna requires one parameter name to keep one
    distribution (the same categorical choices) across a whole study, and a study may hold several methods whose
    spaces share keys with different choices (`model.depth` of resnet and vgg), so every parameter is named per
    method: `resnet:model.depth`. A user's `--choice` also carries its values, since two sweeps of one study may
    offer different ones: `elastic:model.backbone[cifar_resnet,resnet18]`; so does the method choice of a
    multi-method sweep: `method[resnet,vgg]`."""
    return f"{method}:{key}" + (f"[{','.join(map(str, choices))}]" if choices is not None else "")


def method_param_name(methods: Sequence[str]) -> str:
    return f"method[{','.join(methods)}]"


def config_keys(params: dict[str, Any]) -> dict[str, Any]:
    """Optuna parameters (named by `param_name`/`method_param_name`) as flat config keys."""
    out = {}
    for name, value in params.items():
        if name.startswith("method["):
            out["method"] = value
        else:
            out[(name.partition(":")[2] or name).partition("[")[0]] = value
    return out


class FixedAwareTrial:
    """A trial proxy for search spaces: a key the user fixed returns its fixed value and is not searched; the
    others are suggested under their per-method Optuna name and collected as config keys in `values`."""

    def __init__(self, trial: Any, fixed: dict[str, Any], method: str | None = None) -> None:
        self._trial, self._fixed, self._method = trial, fixed, method
        self.values: dict[str, Any] = {}

    def _suggest(self, kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
        if is_fixed(name, self._fixed):
            m = _INDEXED.match(name)
            if name in self._fixed:
                return self._fixed[name]
            return list(self._fixed[m.group(1)])[int(m.group(2))]
        optuna_name = param_name(self._method, name) if self._method else name
        value = getattr(self._trial, f"suggest_{kind}")(optuna_name, *args, **kwargs)
        self.values[name] = value
        return value

    def suggest_float(self, name: str, *args: Any, **kwargs: Any) -> float:
        return self._suggest("float", name, *args, **kwargs)

    def suggest_int(self, name: str, *args: Any, **kwargs: Any) -> int:
        return self._suggest("int", name, *args, **kwargs)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._suggest("categorical", name, choices)


class SweepSpace:
    """The sweep's space: the method first (when several), then the user's `--choice` keys that apply to it
    (categoricals drawn before the method's space, which then sees them as fixed, so a space can depend on them),
    then that method's space, fixed keys left out. Returns the trial's config keys: every suggested value under
    its config key (Optuna knows it by its per-method name, see `param_name`) plus the space's constants.
    A picklable callable, since Tune checkpoints the searcher with it."""

    def __init__(self, methods: Sequence[str], fixed: dict[str, Any],
                 choices: dict[str, Sequence[Any]] | None = None) -> None:
        self.methods, self.fixed = list(methods), dict(fixed)
        self.choices = {k: list(v) for k, v in (choices or {}).items()}

    def __call__(self, trial: Any) -> dict[str, Any]:
        if len(self.methods) == 1 or is_fixed("method", self.fixed):
            method = self.fixed.get("method", self.methods[0])
        else:
            method = trial.suggest_categorical(method_param_name(self.methods), self.methods)
        drawn = {key: trial.suggest_categorical(param_name(method, key, values), values)
                 for key, values in for_method(method, self.choices, self.methods).items()}
        given = {**for_method(method, self.fixed, self.methods), **drawn}
        t = FixedAwareTrial(trial, given, method)
        constants = get_space(method)(t) or {}
        return {"method": method, **drawn, **t.values,
                **{k: v for k, v in constants.items() if not is_fixed(k, given)}}


def choice_applies(key: str, method: str, methods: Sequence[str]) -> bool:
    """Whether a `--set`/`--choice` key applies to `method`: a key qualified with a method (`elastic:model.width`)
    applies to that method only; in a multi-method sweep, a plain `model.*` key applies to the methods that
    define that field."""
    from trainables.methods import get_method

    target, sep, key = key.rpartition(":")
    if sep:
        return target == method
    group, _, name = key.partition(".")
    return group != "model" or len(methods) == 1 or name.split(".")[0] in get_method(method).Hparams.field_names()


def for_method(method: str, keys: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """The keys (fixed values or choices) that apply to `method`, qualified ones under their plain name. A plain
    `model.*` key that no method of the sweep defines stays, and is reported as unknown."""
    from trainables.methods import get_method

    anyone = set().union(*(get_method(m).Hparams.field_names() for m in methods))
    out = {}
    for key, value in keys.items():
        plain = key.rpartition(":")[2]
        group, _, name = plain.partition(".")
        if choice_applies(key, method, methods) or (":" not in key and group == "model"
                                                    and name.split(".")[0] not in anyone):
            out[plain] = value
    return out
