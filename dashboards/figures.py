"""Pareto and compare figures of accuracy vs MACs, shared by the live dashboard and the static report.

Every frontier point of every trial is a faint dot; each group's (method's, or study/method's) non-dominated set is
a line; the best point under a MACs budget is chosen on validation accuracy exactly as `dynastudy best` chooses it
(`study.queries.best_point`), and drawn at its validation or test coordinates. Compute is in MACs per image
(FLOPs = 2 x MACs).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from dashboards import search
from study import queries
from study.pareto import non_dominated
from trainables.hparams import ConfigError
from trainables.methods import METHODS

# (accuracy column, MACs column, accuracy title, MACs title) of each split a plot can show.
SPLITS = {
    "val": ("val_acc", "macs", "validation accuracy", "expected MACs per validation image (log)"),
    "test": ("test_acc", "test_macs", "test accuracy", "expected MACs per test image (log)"),
}
TEMPLATE = "plotly_white"
_PALETTE = qualitative.D3 + qualitative.Dark2
HOVER_KEYS = 8  # searched hyperparameters a hover shows at most
FULL_HOVER_POINTS = 10_000  # up to this many points every dot carries the full hover, beyond it a short one
_POLICY_PARAM = {"budgeted": "q", "entropy": "H<", "confidence": "T", "sdn": "T"}


def color(group: str) -> str:
    """One colour per method everywhere (registry order); other groups (study/method) by a stable hash."""
    method = group.rsplit("/", 1)[-1]
    names = list(METHODS)
    i = names.index(method) if method in names else sum(map(ord, group))
    if "/" in group:
        i += sum(map(ord, group.rsplit("/", 1)[0])) * 7
    return _PALETTE[i % len(_PALETTE)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _operating(row) -> str:
    if row.policy == "static":
        return f"static, exit {int(row.exit)}"
    param = row.param if row.param == row.param else row.threshold
    label = f"{row.policy} {_POLICY_PARAM.get(row.policy, '')}={_fmt(float(param))}"
    thresholds = getattr(row, "thresholds", "")
    if isinstance(thresholds, str) and thresholds not in ("", "[]"):
        tau = [float(t) for t in json.loads(thresholds)]
        shown = ", ".join("none" if abs(t) >= 1e7 else f"{t:.3g}" for t in tau[:8])
        label += f"<br>thresholds [{shown}{', ...' if len(tau) > 8 else ''}]"
    overrides = getattr(row, "overrides", "")
    if isinstance(overrides, str) and overrides not in ("", "{}"):
        label += "<br>" + ", ".join(f"{k}={_fmt(v)}" for k, v in json.loads(overrides).items())
    return label


def hover_texts(points: pd.DataFrame, rows: pd.DataFrame | None = None) -> list[str]:
    """The full hover of each of `rows` (default: every point): trial, method, both accuracies, MACs, the
    operating point (policy, thresholds) and the key hyperparameters (those searched among `points`). Front
    points and the starred one always carry it, the faint dots up to FULL_HOVER_POINTS points."""
    runs = points.drop_duplicates("run_id")
    keys = {m: search.searched_params(runs, m)[:HOVER_KEYS] for m in runs["method"].unique()}
    several = "study" in points and points["study"].nunique() > 1
    texts = []
    for row in (points if rows is None else rows).itertuples():
        params = "<br>".join(f"{k} = {_fmt(row.params.get(k))}" for k in keys.get(row.method, []))
        study = f"study {row.study}<br>" if several else ""
        texts.append(f"<b>{row.method}</b> trial {row.trial} (run {row.run_id[:8]})<br>{study}"
                     f"val_acc {row.val_acc:.4f}, test_acc {row.test_acc:.4f}<br>"
                     f"{row.macs / 1e6:.3f} M MACs ({2 * row.macs / 1e6:.3f} M FLOPs)<br>{_operating(row)}"
                     + (f"<br>{params}" if params else ""))
    return texts


def dot_texts(points: pd.DataFrame) -> list[str]:
    """A short hover per faint dot when there are more than FULL_HOVER_POINTS (method, trial, policy and its
    parameter; the coordinates come from the hovertemplate): the full hovers would be most of the page's size."""
    param = points["param"].where(points["param"].notna(), points.get("threshold"))
    return [f"{m} {t} · " + (f"static exit {int(e)}" if p == "static"
                            else f"{p} {_POLICY_PARAM.get(p, '')}={v:.3g}")
            for m, t, p, e, v in zip(points["method"], points["trial"], points["policy"], points["exit"], param)]


DOT_HOVER = "%{text}<br>%{y:.4f} at %{x:.4s} MACs<extra></extra>"


def group_of(points: pd.DataFrame) -> pd.Series:
    """Method, or study/method when the points come from several studies."""
    if "study" in points and points["study"].nunique() > 1:
        return points["study"].astype(str) + "/" + points["method"].astype(str)
    return points["method"].astype(str)


def front_of(points: pd.DataFrame, split: str = "val") -> pd.DataFrame:
    acc, macs = SPLITS[split][:2]
    return points[non_dominated(points[acc].to_numpy(float), points[macs].to_numpy(float))].sort_values(macs)


def best_under(points: pd.DataFrame, budget: float | None) -> pd.Series | None:
    """The point `dynastudy best --max-macs budget` answers (validation decides), or None when none fits."""
    if budget is None or points.empty:
        return None
    try:
        return queries.best_point(points, max_macs=budget)
    except ConfigError:
        return None


def pareto_figure(points: pd.DataFrame, split: str = "val", budget: float | None = None, title: str = "",
                  full_hover_points: int = FULL_HOVER_POINTS) -> go.Figure:
    """Every point faint, each group's front as a line, the budget as a vertical line and its best point starred.

    Trace names are the contract the browser test reads: "points: G", "front: G", "budget", "best under budget"."""
    acc, macs, acc_title, macs_title = SPLITS[split]
    fig = go.Figure()
    if points.empty:
        fig.add_annotation(text="no finished trial with a frontier yet", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
        fig.update_layout(template=TEMPLATE, title=title)
        return fig
    groups = group_of(points)
    full = len(points) <= full_hover_points  # the full hovers are most of the page's size beyond that
    dots = np.array(hover_texts(points) if full else dot_texts(points), dtype=object)
    for g in sorted(groups.unique()):
        sel = (groups == g).to_numpy()
        part = points[sel]
        fig.add_trace(go.Scattergl(
            x=part[macs], y=part[acc], mode="markers", name=f"points: {g}", legendgroup=g, showlegend=False,
            marker=dict(color=color(g), size=6, opacity=0.3), text=dots[sel],
            hovertemplate="%{text}<extra></extra>" if full else DOT_HOVER, customdata=part["run_id"]))
        front = front_of(part, split)
        fig.add_trace(go.Scatter(
            x=front[macs], y=front[acc], mode="lines+markers", name=f"front: {g}", legendgroup=g,
            line=dict(color=color(g), width=2, shape="hv"), marker=dict(color=color(g), size=8),
            text=hover_texts(points, front), hoverinfo="text", customdata=front["run_id"]))
    if budget is not None:  # always both traces, last, so a budget change can patch them in place
        fig.add_traces(budget_traces(points, split, budget))
    fig.update_layout(template=TEMPLATE, title=title, hovermode="closest", clickmode="event",
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0),
                      title_y=0.98, margin=dict(l=60, r=20, t=90, b=50))
    fig.update_xaxes(type="log", title=macs_title)
    fig.update_yaxes(title=acc_title)
    return fig


def budget_traces(points: pd.DataFrame, split: str, budget: float) -> list[go.Scatter]:
    """The budget as a vertical line across the accuracies shown, and the best point under it (none: empty)."""
    acc, macs = SPLITS[split][:2]
    lo, hi = float(np.nanmin(points[acc])), float(np.nanmax(points[acc]))
    pad = 0.05 * (hi - lo) or 0.01
    best = best_under(points, budget)
    line = go.Scatter(x=[budget, budget], y=[lo - pad, hi + pad], mode="lines", name="budget", hoverinfo="text",
                      text=[f"budget {budget / 1e6:.4g} M MACs"] * 2, showlegend=False,
                      line=dict(color="#444", dash="dash", width=1.5))
    star = go.Scatter(x=[] if best is None else [best[macs]], y=[] if best is None else [best[acc]],
                      mode="markers", name="best under budget", hoverinfo="text",
                      text=[] if best is None else hover_texts(points, points.loc[[best.name]]),
                      customdata=[] if best is None else [best["run_id"]],
                      marker=dict(symbol="star", size=20, color="gold", line=dict(color="black", width=1.5)))
    return [line, star]


def compare_table(points: pd.DataFrame, budget: float | None,
                  ref_macs: float | None = None) -> tuple[pd.DataFrame, float]:
    """Per group: hypervolume of its front against one shared reference point (validation accuracy x MACs, as
    `dynastudy pareto --by-method`), its size, and its best point under the budget with the config reproducing
    it. Returns the table and the reference MACs."""
    if points.empty:
        return pd.DataFrame(), float("nan")
    ref = queries.pareto(points, ref_macs=ref_macs).ref_macs
    groups = group_of(points)
    rows = []
    for g in sorted(groups.unique()):
        part = points[(groups == g).to_numpy()]
        res = queries.pareto(part, ref_macs=ref)
        best = best_under(part, budget)
        row = {"group": g, "trials": res.trials, "points": res.points, "front": len(res.front),
               "hypervolume": res.hypervolume, "best_val_acc": np.nan, "best_test_acc": np.nan,
               "best_macs": np.nan, "best_run": "", "best_trial": "", "config": None}
        if best is not None:
            row.update(best_val_acc=float(best["val_acc"]), best_test_acc=float(best["test_acc"]),
                       best_macs=float(best["macs"]), best_run=best["run_id"], best_trial=best["trial"],
                       config=queries.point_config(best))
        rows.append(row)
    return pd.DataFrame(rows), ref


COMPARE_HEADER = ("group", "trials", "points", "front", "hypervolume (acc x MMACs)", "best val_acc", "best test_acc",
                  "best MMACs", "trial")


def compare_cells(row) -> list[str]:
    """One row of `compare_table` as the page and the report print it (COMPARE_HEADER's columns)."""
    def num(v: float, fmt: str) -> str:
        return "" if v != v else format(v, fmt)  # NaN: no point under the budget

    return [str(row.group), str(row.trials), str(row.points), str(row.front), f"{row.hypervolume / 1e6:.4f}",
            num(row.best_val_acc, ".4f"), num(row.best_test_acc, ".4f"), num(row.best_macs / 1e6, ".4g"),
            str(row.best_trial)]


def budget_range(points: pd.DataFrame) -> tuple[float, float]:
    """log10 of the smallest and largest MACs among the points (the budget slider's span)."""
    macs = points["macs"].to_numpy(float)
    macs = macs[np.isfinite(macs) & (macs > 0)]
    if not len(macs):
        return 6.0, 9.0
    lo, hi = float(np.log10(macs.min())), float(np.log10(macs.max()))
    return (lo, hi) if hi > lo else (lo - 0.1, hi + 0.1)
