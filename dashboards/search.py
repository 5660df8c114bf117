"""The search view: what Optuna explored in one study, rebuilt from the trial runs MLflow holds (the dashboard never
reads the Optuna storage, so it works against any tracking store).

Input is the dashboard's frame of run summaries (`dashboards.data.RUN_COLUMNS`; used here: run_id, method, trial,
status, val_acc, macs, params, and kind and stopped_early where present). A key is *searched* when its value varies
across the trial runs of one method; keys differ between methods, so the view goes method by method, and across
methods with `method` itself as a categorical. Importance is Optuna's fANOVA on an in-memory study rebuilt from the
complete trials (FINISHED, both objectives, not stopped early).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.importance import FanovaImportanceEvaluator, get_param_importances

from study.queries import param_value

Kind = Literal["numeric", "categorical"]

# The sweep's objectives in its order (study/runner.py METRICS, MODES): the rebuilt trials' values are [val_acc, macs].
OBJECTIVES = {"val_acc": "validation accuracy (fraction of images)", "macs": "expected MACs per image"}
DIRECTIONS = ("maximize", "minimize")
MIN_TRIALS = 2
LOG_SPAN = 100.0  # a positive range spanning more than two decades is read (and drawn) on a log scale
NOT_SEARCHED = ("seed",)  # the runner refuses to search the seed; replicates differ in it
# fANOVA because it ranks reliably with the few trials a study has. Optuna's default, PED-ANOVA, contrasts the top
# 10% of trials with the rest (one trial up to 10; its docs ask for 5 there): on 20 synthetic studies of 6 trials
# whose objective depends on one of four params it ranked that param first in 12, fANOVA and the impurity decrease
# (MeanDecreaseImpurity) in 20; with a noisy categorical param fANOVA did a little better than the impurity decrease.
EVALUATOR = "fANOVA"
TEMPLATE = "plotly_white"


# ------------------------------------------------------------------------------------------------ the explored space

def _trials(runs: pd.DataFrame) -> pd.DataFrame:
    """Trial runs of sweeps only: single `dynastudy run`s were never proposed by Optuna."""
    return runs[runs["kind"] == "trial"] if "kind" in runs else runs


def _view(runs: pd.DataFrame, method: str | None) -> pd.DataFrame:
    runs = _trials(runs)
    return runs if method is None else runs[runs["method"] == method]


def _canonical(value: Any) -> Any:
    """A param value as Optuna can hold it: MLflow's strings parsed back, lists as their JSON text."""
    if isinstance(value, str):
        value = param_value(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _row_params(row: pd.Series) -> dict[str, Any]:
    params = {k: _canonical(v) for k, v in (row["params"] or {}).items()}
    params["method"] = row["method"]  # the tag is the truth; the config repeats it
    return params


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _kind(values: list[Any]) -> Kind:
    return "numeric" if all(_is_number(v) for v in values) else "categorical"


def _varying(rows: list[dict[str, Any]]) -> dict[str, Kind]:
    """Keys whose value differs between the runs that have them, with their kind."""
    values: dict[str, list[Any]] = {}
    for params in rows:
        for k, v in params.items():
            values.setdefault(k, []).append(v)
    return {k: _kind(vs) for k, vs in sorted(values.items())
            if k not in NOT_SEARCHED and len(set(vs)) > 1}


def param_kinds(runs: pd.DataFrame, method: str | None = None) -> dict[str, Kind]:
    """The searched params of `method`, or of the whole study when None, each numeric or categorical.

    For one method: every key that varies across its trial runs (any status: a failed trial's config was explored
    too). For a study of several methods: `method`, plus each key every trial run has that is searched within some
    method (a key merely fixed at a different default per method is `method` in disguise)."""
    view = _view(runs, method)
    rows = [_row_params(r) for _, r in view.iterrows()]
    if not rows:
        return {}
    methods = sorted(view["method"].unique())
    if method is not None or len(methods) <= 1:
        kinds = _varying(rows)
        kinds.pop("method", None)
        return kinds
    common = set.intersection(*(set(p) for p in rows))
    searched: set[str] = set()
    for m in methods:
        searched |= set(_varying([p for p in rows if p["method"] == m]))
    kinds = {"method": "categorical"}
    for k in sorted((searched & common) - {"method"}):
        kinds[k] = _kind([p[k] for p in rows])
    return kinds


def searched_params(runs: pd.DataFrame, method: str | None = None) -> list[str]:
    """Names of the searched params (see `param_kinds` for the rule and each one's kind)."""
    return list(param_kinds(runs, method))


def _stopped(runs: pd.DataFrame) -> pd.Series:
    """Trials ASHA stopped early (Optuna PRUNED): their val_acc and macs are a last epoch's, not a result."""
    if "stopped_early" not in runs:
        return pd.Series(False, index=runs.index)
    return runs["stopped_early"].map(lambda v: bool(v) if isinstance(v, (bool, np.bool_)) else
                                     isinstance(v, str) and v != "")


def _finished(runs: pd.DataFrame, objectives: tuple[str, ...]) -> pd.DataFrame:
    ok = runs["status"] == "FINISHED"
    for o in objectives:
        ok &= pd.to_numeric(runs[o], errors="coerce").notna()
    return runs[ok]


def complete_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are COMPLETE trials to Optuna: finished, both objectives logged, not stopped early."""
    done = _finished(runs, tuple(OBJECTIVES))
    return done[~_stopped(done)]


# ------------------------------------------------------------------------------------------------ importance

def _distribution(values: list[Any], kind: Kind) -> BaseDistribution:
    if kind == "categorical":
        return CategoricalDistribution(sorted(set(values), key=repr))
    if all(isinstance(v, int) for v in values):
        return IntDistribution(min(values), max(values))
    low, high = float(min(values)), float(max(values))
    return FloatDistribution(low, high, log=low > 0 and high / low > LOG_SPAN)


def _empty(objective: str, trials: int, why: str) -> pd.Series:
    series = pd.Series(dtype=float, name=objective)
    series.attrs.update(evaluator=EVALUATOR, trials=trials, why=why)
    return series


def importances(runs: pd.DataFrame, method: str | None, objective: str) -> pd.Series:
    """Optuna's fANOVA importance of each searched param for `objective` (val_acc or macs), normalised to sum to 1,
    most important first; `method` None is the whole study (with `method` as a param when it has several).

    Empty (attrs["why"] says why) with fewer than 2 complete trials, no searched param that varies among them,
    or an objective equal in all of them. A param missing from some complete trial is left out (fANOVA takes the
    params every trial has)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    kinds = param_kinds(runs, method)
    done = complete_runs(_view(runs, method))
    n = len(done)
    if n < MIN_TRIALS:
        return _empty(objective, n, f"too few complete trials ({n}; importance needs at least {MIN_TRIALS})")
    rows = [_row_params(r) for _, r in done.iterrows()]
    values = {k: [p[k] for p in rows] for k in kinds if all(k in p for p in rows)}
    varying = {k: vs for k, vs in values.items() if len(set(vs)) > 1}
    if not varying:
        return _empty(objective, n, f"no searched parameter varies among the {n} complete trials")
    target = pd.to_numeric(done[objective]).to_numpy(float)
    if np.ptp(target) == 0:
        return _empty(objective, n, f"{objective} is the same in all {n} complete trials: nothing to attribute")

    dists = {k: _distribution(vs, kinds[k]) for k, vs in varying.items()}
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed=0))
    study.add_trials([
        optuna.trial.create_trial(params={k: float(p[k]) if isinstance(d, FloatDistribution) else p[k]
                                          for k, d in dists.items()},
                                  distributions=dists, values=[float(r["val_acc"]), float(r["macs"])])
        for p, (_, r) in zip(rows, done.iterrows())])
    i = list(OBJECTIVES).index(objective)
    # seeded: the forest is random, and a refresh must not reorder the bars
    imp = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), target=lambda t: t.values[i])
    series = pd.Series(imp, name=objective, dtype=float).sort_values(ascending=False)
    series.attrs.update(evaluator=EVALUATOR, trials=n, why="")
    return series


def importance_figure(series: pd.Series, objective: str) -> go.Figure:
    """Horizontal bars, most important on top; an empty series gives a figure that says why."""
    n = series.attrs.get("trials", "?")
    title = f"Parameter importance for {objective} ({series.attrs.get('evaluator', EVALUATOR)}, " \
            f"{n} complete trial{'' if n == 1 else 's'})"
    if series.empty:
        return _message_figure(title, series.attrs.get("why") or "no importance computed")
    ordered = series.iloc[::-1]  # plotly draws the first bar at the bottom
    fig = go.Figure(go.Bar(x=ordered.to_numpy(), y=[str(k) for k in ordered.index], orientation="h",
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(template=TEMPLATE, title=title, height=max(250, 60 + 28 * len(series)),
                      xaxis_title="importance (share of explained variance, sums to 1)",
                      yaxis_title="parameter (config key)")
    return fig


# ------------------------------------------------------------------------------------------------ figures

def _message_figure(title: str, text: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14))
    fig.update_layout(template=TEMPLATE, title=title, xaxis=dict(visible=False), yaxis=dict(visible=False),
                      height=250)
    return fig


def _other(objective: str) -> str:
    return next(o for o in OBJECTIVES if o != objective)


def _jitter(codes: np.ndarray) -> np.ndarray:
    """Spread the points of each category evenly over +-0.15 around it, so equal values stay visible."""
    out = codes.astype(float)
    for c in np.unique(codes):
        idx = np.flatnonzero(codes == c)
        if len(idx) > 1:
            out[idx] += np.linspace(-0.15, 0.15, len(idx))
    return out


def param_scatter(runs: pd.DataFrame, param: str, objective: str = "val_acc") -> go.Figure:
    """Each finished trial as a point: `param` against `objective`, coloured by the other objective; trials
    stopped early are hollow (their values are a last epoch's). A numeric param has a numeric x axis (log when
    positive and spanning more than two decades), a categorical one a strip with a box per category."""
    other = _other(objective)
    title = f"{param} vs {objective}"
    runs = _finished(_trials(runs), (objective,))
    runs = runs[[param in _row_params(r) for _, r in runs.iterrows()]] if len(runs) else runs
    if runs.empty:
        return _message_figure(title, f"no finished trial with {param} and {objective} yet")
    x = [_row_params(r)[param] for _, r in runs.iterrows()]
    y = pd.to_numeric(runs[objective]).to_numpy(float)
    colour = pd.to_numeric(runs[other], errors="coerce").to_numpy(float)
    stopped = _stopped(runs).to_numpy(bool)
    numeric = _kind(x) == "numeric"

    fig = go.Figure()
    xaxis: dict[str, Any] = dict(title=f"{param} (config value)")
    if numeric:
        xs = np.asarray(x, float)
        if xs.min() > 0 and xs.max() / xs.min() > LOG_SPAN:
            xaxis["type"] = "log"
    else:
        cats = sorted({str(v) for v in x})
        codes = np.array([cats.index(str(v)) for v in x])
        xs = _jitter(codes)
        xaxis.update(title=f"{param} (category)", tickvals=list(range(len(cats))), ticktext=cats)
        fig.add_trace(go.Box(x=codes[~stopped], y=y[~stopped], name="spread", boxpoints=False,
                             marker_color="lightgray", hoverinfo="skip", showlegend=False))
    custom = np.column_stack([runs["run_id"].astype(str), runs["trial"].astype(str), [str(v) for v in x],
                              [f"{c:.4g}" for c in colour]])
    hover = (f"run %{{customdata[0]}}<br>trial %{{customdata[1]}}<br>{param} = %{{customdata[2]}}<br>"
             f"{objective} = %{{y:.4g}}<br>{other} = %{{customdata[3]}}<extra></extra>")
    for name, mask, marker in (
            ("complete", ~stopped, dict(size=9, color=colour[~stopped], colorscale="Viridis", showscale=True,
                                        colorbar=dict(title=dict(text=OBJECTIVES[other])))),
            ("stopped early (last epoch)", stopped, dict(size=9, symbol="circle-open", color="gray"))):
        if mask.any():
            fig.add_trace(go.Scatter(x=xs[mask], y=y[mask], mode="markers", name=name, marker=marker,
                                     customdata=custom[mask], hovertemplate=hover))
    fig.update_layout(template=TEMPLATE, title=title, xaxis=xaxis, yaxis_title=OBJECTIVES[objective],
                      legend=dict(orientation="h", y=-0.2))
    return fig


def _section(runs: pd.DataFrame, method: str | None, label: str, params: list[str]) -> list[tuple[str, go.Figure]]:
    figures = []
    for objective in OBJECTIVES:
        fig = importance_figure(importances(runs, method, objective), objective)
        fig.update_layout(title=f"{label}: {fig.layout.title.text}")
        figures.append((f"{label}: importance for {objective}", fig))
    view = _view(runs, method)
    for param in params:
        fig = param_scatter(view, param, "val_acc")
        fig.update_layout(title=f"{label}: {fig.layout.title.text}")
        figures.append((f"{label}: {param}", fig))
    return figures


def search_figures(runs: pd.DataFrame, method: str | None = None) -> list[tuple[str, go.Figure]]:
    """Everything the search view shows, as (title, figure): per method the importance for each objective and
    one scatter per searched param; for a study of several methods (and no `method` given) first the importance
    across methods, with `method` as a categorical param, and the scatter of `method`."""
    trials = _trials(runs)
    methods = [method] if method is not None else sorted(trials["method"].unique())
    if trials.empty or (method is not None and not (trials["method"] == method).any()):
        what = f"method {method}" if method is not None else "this study"
        return [("search", _message_figure("Search", f"no trial runs of {what} yet"))]
    figures = []
    if len(methods) > 1:  # a key's scatter mixing methods would confound it with method: keys go per method
        figures += _section(runs, None, "all methods", ["method"])
    for m in methods:
        figures += _section(runs, m, m, searched_params(runs, m))
    return figures
