"""The figures of the dashboard's trial view: one trial run (`dashboards.data.TrialData`) in, plotly figures out.

Every panel function returns a figure, or None when the run has no data for it, so `panels()` lists only what a
trial has: training curves, per-exit accuracy vs cumulative MACs, the anytime reading of the exits, the trial's
own frontier, and the panels of one method (gate execution rates of ConvNet-AIG, side heads of DHM/DSL, the
pruning levels of lottery tickets, a lesion study). `summary()` gives the few facts shown above them.
Names of metrics, tables and columns are those `study/tracking.py` documents and `trainables/` writes.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards.data import TrialData
from study.pareto import non_dominated
from study.tracking import TAG_FAIL, TAG_NOTES, TAG_STOPPED

TEMPLATE = "plotly_white"
ACC_FORMAT = ".0%"  # accuracies and errors are fractions; ticks read as percent
MACS_FORMAT = "~s"  # 41000000 -> 41M
VAL, TEST = "#1f77b4", "#d62728"
FAINT = 0.45

PANEL_IDS = ("curves", "frontier", "exits", "anytime", "gates", "heads", "lottery", "lesion")


# --------------------------------------------------------------------------------------------- helpers

def _figure(title: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(template=TEMPLATE, title=title, hovermode="closest", legend=dict(groupclick="toggleitem"))
    return fig


def _series(t: TrialData, key: str) -> tuple[list[int], list[float]]:
    """A metric's history as (steps, values), one value per step: the final result is logged at the last
    epoch's step again, so a step can appear twice; the later entry wins."""
    by_step: dict[int, float] = {}
    for step, value in t.histories.get(key, ()):
        by_step[int(step)] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _indexed(keys, prefix: str) -> list[int]:
    """The indices k of keys named <prefix><k>, sorted."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _num(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _mmacs(macs: float | None) -> str:
    return "n/a MACs" if macs is None or not math.isfinite(macs) else f"{macs / 1e6:.2f}M MACs"


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2%}"


def _table(t: TrialData, name: str) -> pd.DataFrame | None:
    df = t.tables.get(name)
    return df if df is not None and len(df) else None


def _count_ticks(largest: float) -> int:
    """A whole-number tick step for an axis of counts (epochs, levels, blocks) up to `largest`: about ten ticks,
    never fractions."""
    return max(1, math.ceil(largest / 10))


def _acc_axis(title: str) -> dict:
    return dict(title=title, tickformat=ACC_FORMAT, rangemode="tozero")


def _macs_axis(title: str, log: bool = False) -> dict:
    return dict(title=title, tickformat=MACS_FORMAT, type="log" if log else "linear")


# --------------------------------------------------------------------------------------------- panels

def curves(t: TrialData) -> go.Figure | None:
    """Training loss and validation accuracy per epoch (per pruning level for lottery tickets), every exit's and
    side head's validation accuracy as fainter lines, and the learning rate where logged."""
    loss, acc, lr = _series(t, "train_loss"), _series(t, "val_acc"), _series(t, "lr")
    if not loss[0] and not acc[0]:
        return None
    lottery = t.method == "lottery"
    exits = _indexed(t.histories, "val_acc_exit_")
    heads = [h for h in _indexed(t.histories, "val_acc_head_") if h != 0]  # head 0 is the network itself: val_acc
    rows = 3 if lr[0] else 2
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        row_heights=[0.35, 0.45, 0.2][:rows] if rows == 3 else [0.4, 0.6])
    fig.update_layout(template=TEMPLATE, title="Training curves" + (" per pruning level" if lottery else ""),
                      hovermode="x unified", legend=dict(groupclick="toggleitem"), height=220 * rows + 100)

    def x(steps: list[int]) -> list[int]:
        return [s - 1 for s in steps] if lottery else steps  # lottery logs level L at step L + 1

    if loss[0]:
        fig.add_trace(go.Scatter(x=x(loss[0]), y=loss[1], mode="lines+markers", name="training loss",
                                 line=dict(color="#444")), row=1, col=1)
    if acc[0]:
        fig.add_trace(go.Scatter(x=x(acc[0]), y=acc[1], mode="lines+markers", name="validation accuracy",
                                 line=dict(color=VAL, width=3)), row=2, col=1)
    if len(exits) > 1:  # one exit: its accuracy is val_acc already
        for k in exits:
            s = _series(t, f"val_acc_exit_{k}")
            fig.add_trace(go.Scatter(x=x(s[0]), y=s[1], mode="lines", name=f"exit {k}", opacity=FAINT,
                                     legendgroup="exits", legendgrouptitle_text="per exit (validation)",
                                     line=dict(width=1)), row=2, col=1)
    for h in heads:
        s = _series(t, f"val_acc_head_{h}")
        fig.add_trace(go.Scatter(x=x(s[0]), y=s[1], mode="lines", name=f"side head {h}", opacity=FAINT,
                                 legendgroup="heads", legendgrouptitle_text="side heads (validation)",
                                 line=dict(width=1, dash="dot")), row=2, col=1)
    if lr[0]:
        fig.add_trace(go.Scatter(x=x(lr[0]), y=lr[1], mode="lines", name="learning rate",
                                 line=dict(color="#888", width=1)), row=3, col=1)
        fig.update_yaxes(title="learning rate", row=3, col=1)
    fig.update_yaxes(title="training loss (per image)", row=1, col=1)
    fig.update_yaxes(**_acc_axis("validation accuracy (%)"), row=2, col=1)
    last = max(x(loss[0] or acc[0]))
    fig.update_xaxes(title="pruning level" if lottery else "epoch", dtick=_count_ticks(last), row=rows, col=1)
    return fig


def _exit_metrics(t: TrialData) -> pd.DataFrame | None:
    """Per exit: cumulative MACs, validation and test accuracy, fraction of validation samples leaving there."""
    ks = _indexed(t.metrics, "macs_exit_")
    if not ks:
        return None
    return pd.DataFrame({"exit": ks, "macs": [_num(t.metrics, f"macs_exit_{k}") for k in ks],
                         "val_acc": [_num(t.metrics, f"val_acc_exit_{k}") for k in ks],
                         "test_acc": [_num(t.metrics, f"test_acc_exit_{k}") for k in ks],
                         "fraction": [_num(t.metrics, f"exit_fraction_{k}") for k in ks]})


def exits(t: TrialData) -> go.Figure | None:
    """Validation and test accuracy of every exit vs its cumulative MACs (every earlier head included), with the
    fraction of validation samples the trial's policy sends out there, and the operating point. None for a
    network with one exit (its numbers are the summary's)."""
    df = _exit_metrics(t)
    if df is None or len(df) < 2:
        return None
    fig = _figure("Per-exit accuracy vs cumulative MACs")
    hover = [f"exit {int(r.exit)}<br>{_mmacs(r.macs)}<br>validation {_pct(r.val_acc)}, test {_pct(r.test_acc)}"
             + (f"<br>{r.fraction:.1%} of validation samples leave here" if pd.notna(r.fraction) else "")
             for r in df.itertuples()]
    for col, name, color, dash in (("val_acc", "validation", VAL, "solid"), ("test_acc", "test", TEST, "dash")):
        if df[col].notna().any():
            fig.add_trace(go.Scatter(x=df["macs"], y=df[col], mode="lines+markers", name=name, hovertext=hover,
                                     hoverinfo="text", line=dict(color=color, dash=dash)))
    acc, macs = _num(t.metrics, "val_acc"), _num(t.metrics, "macs")
    if acc is not None and macs is not None:
        fig.add_trace(go.Scatter(x=[macs], y=[acc], mode="markers", name="operating point (validation)",
                                 marker=dict(symbol="star", size=14, color="black"),
                                 hovertext=[f"operating point: {_pct(acc)} at {_mmacs(macs)} (expected)"],
                                 hoverinfo="text"))
    fig.update_layout(xaxis=_macs_axis("cumulative MACs per image"), yaxis=_acc_axis("accuracy (%)"))
    return fig


def anytime(t: TrialData) -> go.Figure | None:
    """The anytime-prediction reading of a multi-exit network (MSDNet's first setting, but it applies to every
    network with more than one exit): with a per-image budget of B MACs the answer is the deepest exit computed
    within B, so test accuracy is a step function of the budget."""
    df = _exit_metrics(t)
    if df is None or len(df) < 2 or df["test_acc"].isna().all():
        return None
    df = df.dropna(subset=["macs", "test_acc"]).sort_values("macs")
    fig = _figure("Anytime prediction: test accuracy of the deepest exit within a per-image budget")
    fig.add_trace(go.Scatter(x=df["macs"], y=df["test_acc"], mode="lines+markers", line_shape="hv",
                             name="anytime (test)", line=dict(color=TEST),
                             hovertext=[f"exit {int(r.exit)} from {_mmacs(r.macs)}: test {_pct(r.test_acc)}"
                                        for r in df.itertuples()], hoverinfo="text"))
    fig.update_layout(xaxis=_macs_axis("budget per image (MACs)"), yaxis=_acc_axis("test accuracy (%)"),
                      showlegend=False)
    return fig


def _compact_json(text: str, digits: int = 3, limit: int = 8) -> str:
    """A JSON list or dict as a short string: floats rounded, long lists cut."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return str(text)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        items = [f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in value]
        return "[" + ", ".join(items[:limit]) + (", ..." if len(items) > limit else "") + "]"
    return str(value)


def _frontier_hover(r: pd.Series, acc: str, macs: str) -> str:
    lines = [f"<b>{r['policy']}</b>" + (" (operating point)" if r.get("operating") else "")]
    if r["policy"] == "static":
        lines.append(f"exit {int(r['exit'])}")
    elif pd.notna(r.get("param")):
        lines.append(f"param {r['param']:.4g}")
    thresholds = _compact_json(r.get("thresholds", "[]"))
    if thresholds != "[]":
        lines.append(f"thresholds {thresholds}")
    if "level" in r and pd.notna(r["level"]):
        lines.append(f"level {int(r['level'])}, density {r['density']:.2%}")
    overrides = _compact_json(r.get("overrides", "{}"))
    if overrides:
        lines.append(f"overrides {overrides}")
    lines.append(f"{_pct(r[acc])} at {_mmacs(r[macs])}")
    if r.get("exit_fractions"):
        lines.append(f"exit fractions (validation) {_compact_json(r['exit_fractions'], digits=2)}")
    return "<br>".join(lines)


def frontier(t: TrialData, acc: str = "val_acc") -> go.Figure | None:
    """Every operating point of the trial's exit-policy grids (its frontier.parquet), coloured by policy, the
    operating point starred and the non-dominated points joined; `acc` "val_acc" (with the expected validation
    MACs, what search compares) or "test_acc" (with the test MACs, reported only)."""
    if acc not in ("val_acc", "test_acc"):
        raise ValueError(f"acc={acc!r}; valid: val_acc, test_acc")
    df = _table(t, "frontier")
    if df is None:
        return None
    macs = "macs" if acc == "val_acc" else "test_macs"
    df = df[np.isfinite(df[acc].astype(float)) & np.isfinite(df[macs].astype(float))]
    if not len(df):
        return None
    split = "validation" if acc == "val_acc" else "test"
    fig = _figure(f"Frontier of the trial's exit policies ({split})")
    overrides = df["overrides"] if "overrides" in df else pd.Series("{}", index=df.index)
    # Lottery tickets give every level its own `overrides` (model.levels): one series, the level in the hover.
    # Elsewhere an override is an evaluation-only variant (an AIG cut-off), a series of its own.
    by_variant = "level" not in df
    labels = [p if not by_variant or o in ("{}", "", None) else f"{p} ({_compact_json(o)})"
              for p, o in zip(df["policy"], overrides)]
    df = df.assign(_label=labels)
    points = df[~df["operating"].astype(bool)] if "operating" in df else df
    for label, group in points.groupby("_label", sort=False):
        group = group.sort_values(macs)
        fig.add_trace(go.Scatter(x=group[macs], y=group[acc], mode="markers", name=label,
                                 hovertext=[_frontier_hover(r, acc, macs) for _, r in group.iterrows()],
                                 hoverinfo="text", marker=dict(size=7, opacity=0.8)))
    front = df[non_dominated(df[acc].to_numpy(float), df[macs].to_numpy(float))].sort_values(macs)
    fig.add_trace(go.Scatter(x=front[macs], y=front[acc], mode="lines", line_shape="hv", name="non-dominated",
                             line=dict(color="#999", dash="dot", width=1), hoverinfo="skip"))
    if "operating" in df:
        op = df[df["operating"].astype(bool)]
        if len(op):
            fig.add_trace(go.Scatter(x=op[macs], y=op[acc], mode="markers", name="operating point",
                                     marker=dict(symbol="star", size=15, color="black"),
                                     hovertext=[_frontier_hover(r, acc, macs) for _, r in op.iterrows()],
                                     hoverinfo="text"))
    title = "expected MACs per image" + (" (validation)" if acc == "val_acc" else " (test)")
    fig.update_layout(xaxis=_macs_axis(title, log=True), yaxis=_acc_axis(f"{split} accuracy (%)"))
    return fig


def gate_heatmap(t: TrialData) -> go.Figure | None:
    """ConvNet-AIG: the validation execution rate of every gated layer for every class (gate_rates.parquet),
    rows labelled with the block the gate switches."""
    df = _table(t, "gate_rates")
    if df is None:
        return None
    rate = df.pivot_table(index="layer", columns="class", values="rate", aggfunc="first").sort_index()
    count = df.pivot_table(index="layer", columns="class", values="count", aggfunc="first").reindex_like(rate)
    block = df.drop_duplicates("layer").set_index("layer")["block"].reindex(rate.index)
    names = [str(b) for b in block]
    if len(set(names)) < len(names):  # a block with several gates: the layer index tells them apart
        names = [f"{l}: {b}" for l, b in zip(rate.index, block)]
    per_layer = [_num(t.metrics, f"gate_rate_{l}") for l in rate.index]
    text = [[f"{int(c)} samples" + (f"; layer mean {m:.3f}" if m is not None else "") for c in row]
            for row, m in zip(count.to_numpy(), per_layer)]
    fig = _figure("Gate execution rate per layer and class (validation)")
    fig.add_trace(go.Heatmap(z=rate.to_numpy(float), x=[f"class {c}" for c in rate.columns], y=names,
                             zmin=0, zmax=1, colorscale="Viridis", text=text,
                             colorbar=dict(title="execution rate (fraction of samples)"),
                             hovertemplate="%{y}, %{x}<br>rate %{z:.3f}<br>%{text}<extra></extra>"))
    fig.update_layout(xaxis=dict(title="class (validation samples)"),
                      yaxis=dict(title="gated layer (block it switches)", autorange="reversed"),
                      height=max(320, 40 + 22 * len(names)))
    return fig


def heads(t: TrialData) -> go.Figure | None:
    """DHM/DSL: validation and test accuracy of every head vs the MACs of its path (heads.parquet); head 0 is the
    network inference runs, the side heads exist in training only."""
    df = _table(t, "heads")
    if df is None:
        return None
    df = df.sort_values("macs")
    names = [f"head {int(h)}" + (" (inference)" if int(h) == 0 else " (side, train-only)") for h in df["head"]]
    fig = _figure("Heads: accuracy vs path MACs (head 0 runs at inference; side heads only in training)")
    for col, name, color, symbol in (("val_acc", "validation", VAL, "circle"),
                                     ("test_acc", "test", TEST, "diamond-open")):
        fig.add_trace(go.Scatter(x=df["macs"], y=df[col], mode="markers+text" if col == "val_acc" else "markers",
                                 name=name, text=[f"head {int(h)}" for h in df["head"]], textposition="top center",
                                 cliponaxis=False, marker=dict(size=11, color=color, symbol=symbol),
                                 hovertext=[f"{n}<br>{_mmacs(m)}<br>{name} {_pct(a)}"
                                            for n, m, a in zip(names, df["macs"], df[col])], hoverinfo="text"))
    fig.update_layout(xaxis=_macs_axis("MACs per image of the head's path"), yaxis=_acc_axis("accuracy (%)"))
    return fig


def lottery(t: TrialData) -> go.Figure | None:
    """Lottery tickets: validation and test accuracy of every pruning level vs its density (log axis, reversed so
    pruning goes right), with the reinit and random-mask controls where trained; sparse MACs in the hover."""
    df = _table(t, "lottery")
    if df is None:
        return None
    df = df.sort_values("level")
    fig = _figure("Lottery ticket: accuracy vs density per pruning level")
    series = (("", "ticket", VAL), ("reinit_", "reinit control", "#ff7f0e"),
              ("random_mask_", "random-mask control", "#2ca02c"))
    for prefix, name, color in series:
        for split, dash in (("val", "solid"), ("test", "dash")):
            col = f"{prefix}{split}_acc"
            if col not in df or df[col].isna().all():
                continue
            rows = df[df[col].notna()]
            hover = [f"{name}, level {int(r['level'])}<br>density {r['density']:.2%}<br>"
                     f"{'validation' if split == 'val' else 'test'} {_pct(r[col])}<br>"
                     f"sparse {_mmacs(r['sparse_macs'])} (dense {r['dense_macs'] / 1e6:.2f}M)"
                     for _, r in rows.iterrows()]
            fig.add_trace(go.Scatter(x=rows["density"], y=rows[col], mode="lines+markers",
                                     name=f"{name} ({'validation' if split == 'val' else 'test'})",
                                     line=dict(color=color, dash=dash), hovertext=hover, hoverinfo="text"))
    fig.update_layout(xaxis=dict(title="density (fraction of prunable weights kept, log scale)", type="log",
                                 autorange="reversed", tickformat=".1%"),
                      yaxis=_acc_axis("accuracy (%)"))
    return fig


def _by_k(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    # The same aggregates as trainables.lesion.summary (population sd), computed here so that the dashboard
    # does not import torch.
    return (df[df["kind"] == kind].groupby("k")
            .agg(mean=("error", "mean"), sd=("error", lambda e: float(np.std(e))), n=("error", "size"),
                 tau=("kendall_tau", "mean")).reset_index())


def lesion(t: TrialData) -> go.Figure | None:
    """Veit et al.'s lesion study (lesion.parquet, `dynastudy lesion`): test error vs blocks deleted (the intact
    network at 0, each single deletion at 1, k random deletions as mean +- sd over repeats) and, where measured,
    test error vs random swaps of units."""
    df = _table(t, "lesion")
    if df is None:
        return None
    base = df[df["kind"] == "none"]["error"]
    baseline = float(base.iloc[0]) if len(base) else None
    single, random, reorder = df[df["kind"] == "single"], _by_k(df, "random"), _by_k(df, "reorder")
    cols = 2 if len(reorder) else 1
    fig = make_subplots(rows=1, cols=cols, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("deleted blocks", "reordered blocks")[:cols])
    fig.update_layout(template=TEMPLATE, title="Lesion study: test error after deleting or reordering blocks",
                      hovermode="closest")
    if len(single):
        units = [_compact_json(u) for u in single["units"]]
        fig.add_trace(go.Scatter(x=single["k"], y=single["error"], mode="markers", name="one block deleted",
                                 marker=dict(color=VAL, size=7, opacity=0.7),
                                 hovertext=[f"block {u} deleted: error {_pct(e)}"
                                            for u, e in zip(units, single["error"])], hoverinfo="text"),
                      row=1, col=1)
    for frame, name, color, col, what in ((random, "k random blocks deleted (mean ± sd)", TEST, 1, "deleted"),
                                          (reorder, "s random swaps (mean ± sd)", "#9467bd", 2, "swaps")):
        if not len(frame):
            continue
        x, y, sd = frame["k"].tolist(), frame["mean"].tolist(), frame["sd"].tolist()
        hover = [f"{k} {what}: error {_pct(m)} ± {s:.2%} over {n}" + (f"<br>mean Kendall tau {tau:.3f}"
                                                                       if what == "swaps" else "")
                 for k, m, s, n, tau in zip(x, y, sd, frame["n"], frame["tau"])]
        if baseline is not None:  # the curve starts at the intact network
            x, y, sd, hover = [0] + x, [baseline] + y, [0.0] + sd, [f"intact: error {_pct(baseline)}"] + hover
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, line=dict(color=color),
                                 error_y=dict(type="data", array=sd, visible=True), hovertext=hover,
                                 hoverinfo="text"), row=1, col=col)
    if baseline is not None:  # drawn last: on top of the curves that start from it
        fig.add_trace(go.Scatter(x=[0], y=[baseline], mode="markers", name="intact network",
                                 marker=dict(color="black", size=10),
                                 hovertext=[f"intact: error {_pct(baseline)}"], hoverinfo="text"), row=1, col=1)
    deleted = max([1] + random["k"].tolist())
    fig.update_xaxes(title="blocks deleted (count)", dtick=_count_ticks(deleted), row=1, col=1)
    if cols == 2:
        fig.update_xaxes(title="random swaps (count)", dtick=_count_ticks(reorder["k"].max()), row=1, col=2)
    fig.update_yaxes(title="test error (%)", tickformat=ACC_FORMAT, rangemode="tozero", row=1, col=1)
    return fig


# --------------------------------------------------------------------------------------------- the view

def panels(t: TrialData) -> list[tuple[str, str, go.Figure]]:
    """(panel id, title, figure) of every panel the trial has data for, general panels first."""
    makers = {"curves": curves, "frontier": frontier, "exits": exits, "anytime": anytime, "gates": gate_heatmap,
              "heads": heads, "lottery": lottery, "lesion": lesion}
    out = []
    for pid in PANEL_IDS:
        try:
            fig = makers[pid](t)
        except (KeyError, ValueError, TypeError, IndexError) as e:  # a table of an older layout: say so, go on
            fig = _figure(f"{pid}: this run's data could not be drawn ({type(e).__name__}: {e})")
        if fig is not None:
            out.append((pid, fig.layout.title.text or pid, fig))
    return out


def _params_row(params: dict[str, Any], prefix: str, keys: tuple[str, ...] | None = None) -> str:
    items = [(k[len(prefix):], v) for k, v in params.items() if k.startswith(prefix)]
    if keys is not None:
        items = [(k, v) for k, v in items if k in keys]
    return ", ".join(f"{k}={v}" for k, v in sorted(items))


# The policy.* keys that say what each policy does (the others are ignored by it).
_POLICY_KEYS = {"static": ("exit",), "confidence": ("threshold", "thresholds"), "sdn": ("threshold", "thresholds"),
                "budgeted": ("q",), "entropy": ("entropy", "entropies")}


def _policy_text(params: dict[str, Any]) -> str | None:
    name = params.get("policy.name")
    if name is None:
        return None
    keys = _POLICY_KEYS.get(str(name), ())
    # a per-exit list overrides the shared value; show the shared one only when the list is empty
    shown = [k for k in keys if str(params.get(f"policy.{k}", "")) not in ("", "[]", "()")]
    if len(shown) == 2:
        shown = shown[1:]
    details = ", ".join(f"{k}={params[f'policy.{k}']}" for k in shown)
    return f"{name}" + (f" ({details})" if details else "")


def summary(t: TrialData) -> list[tuple[str, str]]:
    """(label, value) rows of the facts shown above the panels: identity, results, cost, the settings that
    define the trial, and its notes or failure."""
    m, rows = t.metrics, [("method", t.method), ("trial", t.trial), ("run", t.run_id), ("status", t.status)]
    for key, label in (("val_acc", "validation accuracy"), ("test_acc", "test accuracy")):
        if _num(m, key) is not None:
            rows.append((label, f"{m[key]:.4f}"))
    macs, full = _num(m, "macs"), _num(m, "macs_full")
    if macs is not None:
        text = f"{macs / 1e6:.2f}M at the operating point (validation; FLOPs = 2 x MACs = {2 * macs / 1e6:.2f}M)"
        if full is not None and abs(full - macs) > 0.5:
            text += f"; whole network {full / 1e6:.2f}M"
        rows.append(("MACs per image", text))
    if _num(m, "train_macs") is not None:
        rows.append(("training MACs per image (forward)", f"{m['train_macs'] / 1e6:.2f}M"))
    k = t.exits()
    if k > 1:
        rows.append(("exits", str(k)))
    if _num(m, "gate_rate_mean") is not None:
        rows.append(("mean gate execution rate", f"{m['gate_rate_mean']:.3f}"))
    if t.method == "lottery" and _num(m, "density") is not None:
        rows.append(("density (prunable weights kept)", f"{m['density']:.2%}"))
    for label, text in (("model", _params_row(t.params, "model.")),
                        ("policy", _policy_text(t.params) if k > 1 else None),
                        ("training", _params_row(t.params, "optim.", ("epochs", "batch_size", "lr", "schedule",
                                                                      "weight_decay"))),
                        ("data", _params_row(t.params, "data.", ("dataset", "subset", "val_size")))):
        if text:
            rows.append((label, text))
    for tag, label in ((TAG_NOTES, "notes"), (TAG_STOPPED, "stopped early"), (TAG_FAIL, "fail reason")):
        if t.tags.get(tag):
            rows.append((label, t.tags[tag]))
    return rows
