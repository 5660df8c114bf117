"""`dynastudy dashboard`: a live Pareto explorer over MLflow (Dash).

Dash was chosen because its figures are plotly's (the same figures go into the static report), callbacks are
plain Python over the platform's own queries, partial updates (`Patch`) let the budget slider move a line and a
star without resending thousands of points, and it needs no JavaScript build. `serve` runs it under gunicorn: one
worker process, so every page shares one `StudyCache`, with a thread per request.

Four tabs: Pareto (study picker, val/test switch, MACs budget slider, best point under it as a config), Trial
(curves, per-exit accuracy and MACs, the trial's frontier, method panels), Compare (several studies or methods,
hypervolumes against one reference point, the best configuration per group under a budget) and Search (what
Optuna explored). A timer asks `StudyCache` for the study's version; views redraw only when it changed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dash
import numpy as np
import pandas as pd
import yaml
from dash import Input, Output, Patch, State, dcc, html, no_update

from dashboards import figures, panels, search
from dashboards.data import StudyCache, load_trial
from study import queries
from study.tracking import Tracker, redact

SPLIT_OPTIONS = [{"label": "validation", "value": "val"}, {"label": "test", "value": "test"}]
_CARD = {"border": "1px solid #ddd", "borderRadius": "6px", "padding": "10px", "margin": "8px 0"}


def _config_block(config: dict[str, Any], block_id: str) -> html.Div:
    """A config as YAML (what `dynastudy run --config` takes) with a copy button."""
    text = yaml.safe_dump(config, sort_keys=False)
    return html.Div([dcc.Clipboard(target_id=block_id, title="copy config", style={"float": "right"}),
                     html.Pre(text, id=block_id, style={"fontSize": "12px", "maxHeight": "220px",
                                                        "overflow": "auto", "background": "#f7f7f7"})])


def _budget(slider: float | None) -> float | None:
    """The slider's log10 value as whole MACs, so the `dynastudy best --max-macs` shown answers the same."""
    return None if slider is None else float(round(10 ** slider))


def _marks(lo: float, hi: float) -> dict:
    ticks = np.arange(np.ceil(lo * 2) / 2, hi + 1e-9, 0.5)
    return {float(t): f"{10 ** t / 1e6:.3g}M" for t in ticks}


def layout(cache: StudyCache, refresh_s: float) -> html.Div:
    studies = cache.studies()
    first = studies[0] if studies else None
    return html.Div(style={"fontFamily": "sans-serif", "margin": "0 16px"}, children=[
        dcc.Interval(id="tick", interval=int(refresh_s * 1000)),
        dcc.Store(id="version"),
        dcc.Store(id="pareto-shown"),
        dcc.Store(id="trial-shown"),
        html.Div(style={"display": "flex", "gap": "16px", "alignItems": "center"}, children=[
            html.H3("dynastudy", style={"margin": "8px 0"}),
            dcc.Dropdown(id="study", options=studies, value=first, clearable=False, placeholder="study",
                         style={"width": "260px"}),
            html.Span(id="status", style={"color": "#555", "fontSize": "13px"}),
            html.Span(redact(cache.tracker.uri), style={"color": "#999", "fontSize": "12px", "marginLeft": "auto"}),
        ]),
        dcc.Tabs(id="tabs", value="pareto", children=[
            dcc.Tab(label="Pareto", value="pareto", children=[
                html.Div(style={"display": "flex", "gap": "24px", "alignItems": "center", "marginTop": "8px"},
                         children=[
                    dcc.RadioItems(id="split", options=SPLIT_OPTIONS, value="val", inline=True),
                    html.Div(style={"flex": "1"}, children=[
                        dcc.Slider(id="budget", min=6, max=9, step=0.005, value=7.5, updatemode="drag",
                                   marks=None, tooltip=None, allow_direct_input=False),
                    ]),
                    html.Span(id="budget-value", style={"minWidth": "220px"}),
                ]),
                dcc.Graph(id="pareto-graph", style={"height": "560px"}, config={"displaylogo": False}),
                html.Div(id="best-point", style=_CARD),
            ]),
            dcc.Tab(label="Trial", value="trial", children=[
                dcc.Dropdown(id="trial-run", placeholder="trial (click a point on the Pareto plot)",
                             style={"marginTop": "8px"}),
                dcc.Loading(html.Div(id="trial-view")),
            ]),
            dcc.Tab(label="Compare", value="compare", children=[
                html.Div(style={"display": "flex", "gap": "16px", "marginTop": "8px", "alignItems": "center"},
                         children=[
                    dcc.Dropdown(id="compare-studies", multi=True, placeholder="studies", style={"width": "380px"}),
                    dcc.Dropdown(id="compare-methods", multi=True, placeholder="methods (all)",
                                 style={"width": "300px"}),
                    dcc.RadioItems(id="compare-split", options=SPLIT_OPTIONS, value="val", inline=True),
                    html.Label(["budget (MACs) ", dcc.Input(id="compare-budget", type="number", debounce=True,
                                                            placeholder="the Pareto tab's", min=1,
                                                            style={"width": "170px"})]),
                ]),
                dcc.Loading(html.Div(id="compare-view")),
            ]),
            dcc.Tab(label="Search", value="search", children=[
                dcc.Dropdown(id="search-method", placeholder="method (all)", style={"marginTop": "8px",
                                                                                     "width": "300px"}),
                dcc.Loading(html.Div(id="search-view")),
            ]),
        ]),
    ])


def create_app(cache: StudyCache, refresh_s: float = 5.0) -> dash.Dash:
    app = dash.Dash(__name__, title="dynastudy", suppress_callback_exceptions=True,
                    update_title=None)
    app.layout = lambda: layout(cache, refresh_s)  # a page load sees the studies of that moment
    tracker = cache.tracker
    search_cache: dict[tuple, list] = {}  # (study, version, method) -> the search view's figures

    @app.callback(Output("version", "data"), Output("study", "options"), Output("status", "children"),
                  Input("tick", "n_intervals"), Input("study", "value"), State("version", "data"))
    def poll(_, study, seen):
        studies = cache.studies()
        if not study:
            return no_update, studies, "no study in this tracking store yet"
        version = {"study": study, "v": cache.version(study)}
        runs = cache.runs(study)
        counts = runs["status"].value_counts()
        status = (f"{len(runs)} trials: {counts.get('FINISHED', 0)} finished, {counts.get('RUNNING', 0)} running, "
                  f"{len(runs) - counts.get('FINISHED', 0) - counts.get('RUNNING', 0)} failed or stopped; "
                  f"checked {time.strftime('%H:%M:%S')}")
        return (no_update if version == seen else version), studies, status

    @app.callback(Output("budget", "min"), Output("budget", "max"), Output("budget", "marks"),
                  Output("budget", "value"), Input("version", "data"), State("budget", "value"),
                  State("budget", "min"), State("budget", "max"))
    def budget_span(version, value, old_lo, old_hi):
        if not version:
            return no_update, no_update, no_update, no_update
        points = cache.points(version["study"])
        lo, hi = figures.budget_range(points)
        if value is None or not (old_lo <= value <= old_hi) or (old_lo, old_hi) == (6, 9):
            value = round((lo + hi) / 2, 3)  # a first look starts half way (log scale) between the extremes
        return lo, hi, _marks(lo, hi), min(max(value, lo), hi)

    @app.callback(Output("pareto-graph", "figure"), Output("budget-value", "children"),
                  Output("best-point", "children"), Output("pareto-shown", "data"), Input("version", "data"),
                  Input("split", "value"), Input("budget", "value"), State("pareto-shown", "data"))
    def pareto(version, split, budget_log, shown):
        if not version:
            return figures.pareto_figure(pd.DataFrame(), split), "", "", None
        study = version["study"]
        points = cache.points(study)
        budget = _budget(budget_log)
        if points.empty or budget is None:
            return figures.pareto_figure(points, split, title=f"study {study}"), "", "no finished trial yet", None
        key = {**version, "split": split}  # what the figure on the page was drawn from
        if dash.ctx.triggered_id == "budget" and shown == key:
            # Only the budget moved: patch its line and star in place instead of resending every point.
            fig = Patch()
            first = 2 * figures.group_of(points).nunique()  # after each group's points and front
            for i, trace in enumerate(figures.budget_traces(points, split, budget)):
                fig["data"][first + i] = trace.to_plotly_json()
        else:
            fig = figures.pareto_figure(points, split, budget=budget,
                                        title=f"study {study}: {points['run_id'].nunique()} trials, "
                                              f"{len(points)} operating points")
            fig.update_layout(uirevision=f"{study}/{split}")  # zoom survives refreshes
        label = html.Span(f"budget {budget / 1e6:.4g} M MACs per image", id="budget-label",
                          **{"data-budget": repr(budget)})
        return fig, label, _best_card(points, budget, study), key

    @app.callback(Output("tabs", "value"), Output("trial-run", "value"), Input("pareto-graph", "clickData"),
                  prevent_initial_call=True)
    def open_trial(click):
        try:
            run_id = click["points"][0]["customdata"]
        except (TypeError, KeyError, IndexError):
            return no_update, no_update
        return "trial", run_id

    @app.callback(Output("trial-run", "options"), Input("version", "data"))
    def trial_options(version):
        if not version:
            return []
        runs = cache.runs(version["study"])
        return [{"label": f"{r.trial or r.run_id[:8]} · {r.method} · {r.status.lower()}"
                          + (f" · val_acc {r.val_acc:.4f}" if r.val_acc == r.val_acc else ""),
                 "value": r.run_id} for r in runs.iloc[::-1].itertuples()]

    @app.callback(Output("trial-view", "children"), Output("trial-shown", "data"), Input("trial-run", "value"),
                  Input("version", "data"), State("trial-shown", "data"))
    def trial_view(run_id, version, shown):
        if not run_id:
            return html.P("Pick a trial, or click a point on the Pareto plot."), None
        if dash.ctx.triggered_id == "version" and shown == {"run_id": run_id, "status": "FINISHED"}:
            return no_update, no_update  # a finished trial's view does not change
        t = load_trial(tracker, run_id)
        rows = [html.Tr([html.Th(k, style={"textAlign": "left", "paddingRight": "12px"}), html.Td(v)])
                for k, v in panels.summary(t)]
        children = [html.Table(rows, id="trial-summary", style=_CARD,
                               **{"data-run-id": run_id, "data-status": t.status})]
        for pid, title, fig in panels.panels(t):
            children.append(html.Div(id=f"panel-{pid}", className="panel", style=_CARD, children=[
                html.H4(title, style={"margin": "4px 0"}), dcc.Graph(figure=fig, config={"displaylogo": False})]))
        return children, {"run_id": run_id, "status": t.status}

    @app.callback(Output("compare-studies", "options"), Output("compare-studies", "value"),
                  Input("version", "data"), State("compare-studies", "value"))
    def compare_studies(version, chosen):
        studies = cache.studies()
        if chosen:
            return studies, no_update
        return studies, [version["study"]] if version else []

    @app.callback(Output("compare-methods", "options"), Output("compare-view", "children"),
                  Input("compare-studies", "value"), Input("compare-methods", "value"),
                  Input("compare-split", "value"), Input("compare-budget", "value"), Input("version", "data"),
                  Input("tabs", "value"), State("budget", "value"))
    def compare(studies, methods, split, budget, _, tab, pareto_budget):
        if tab != "compare":  # its figure is as heavy as the Pareto tab's: drawn only when looked at
            return no_update, no_update
        if not studies:
            return [], html.P("Pick one or more studies.")
        points = pd.concat([cache.points(s) for s in studies], ignore_index=True)
        options = sorted(points["method"].unique()) if not points.empty else []
        if methods:
            points = points[points["method"].isin(methods)].reset_index(drop=True)
        if points.empty:
            return options, html.P("No finished trial with a frontier in this selection yet.")
        if not budget or budget <= 0:  # no budget typed here: the Pareto tab's
            budget = _budget(pareto_budget)
        fig = figures.pareto_figure(points, split, budget=budget, title="compare: " + ", ".join(studies))
        table, ref = figures.compare_table(points, budget)
        return options, [dcc.Graph(id="compare-graph", figure=fig, style={"height": "520px"}),
                         _compare_table(table, ref, budget)]

    @app.callback(Output("search-method", "options"), Output("search-view", "children"),
                  Input("version", "data"), Input("search-method", "value"), Input("tabs", "value"))
    def search_view(version, method, tab):
        if tab != "search":  # importance fits take seconds: only when looked at
            return no_update, no_update
        if not version:
            return [], ""
        runs = cache.runs(version["study"])
        options = sorted(runs["method"].unique())
        key = (version["study"], version["v"], method or None)
        if key not in search_cache:  # importance fits take seconds: once per study version
            search_cache.clear()
            search_cache[key] = search.search_figures(runs, method or None)
        figs = search_cache[key]
        return options, [html.Div(style=_CARD, children=[html.H4(title, style={"margin": "4px 0"}),
                                                         dcc.Graph(figure=fig)]) for title, fig in figs]

    return app


def _best_card(points: pd.DataFrame, budget: float, study: str) -> html.Div:
    """The best point under the budget, as `dynastudy best` picks it, with the config that reproduces it."""
    best = figures.best_under(points, budget)
    if best is None:
        return html.Div(f"No point needs at most {budget / 1e6:.4g} M MACs; the cheapest needs "
                        f"{points['macs'].min() / 1e6:.4g} M.", id="best-none")
    return html.Div(id="best-info", **{"data-run-id": best["run_id"], "data-val-acc": repr(float(best["val_acc"])),
                                       "data-macs": repr(float(best["macs"]))}, children=[
        html.B(f"Best under {budget / 1e6:.4g} M MACs (chosen on validation): "),
        f"{best['method']} trial {best['trial']}, val_acc {best['val_acc']:.4f}, test_acc {best['test_acc']:.4f}, "
        f"{best['macs'] / 1e6:.4g} M MACs ({2 * best['macs'] / 1e6:.4g} M FLOPs), policy {best['policy']}. Same as ",
        html.Code(f"dynastudy best --study {study} --max-macs {budget:.0f}"),
        _config_block(queries.point_config(best), "best-config"),
    ])


def _compare_table(table: pd.DataFrame, ref_macs: float, budget: float | None) -> html.Div:
    rows = [html.Tr([html.Td(c) for c in figures.compare_cells(r)]) for r in table.itertuples()]
    configs = [html.Details([html.Summary(f"config of the best {r.group} point"), _config_block(r.config,
                                                                                                  f"config-{i}")])
               for i, r in enumerate(table.itertuples()) if r.config]
    note = (f"Hypervolume of validation accuracy x MACs against one reference point (val_acc 0, "
            f"{ref_macs / 1e6:.4g} M MACs); best points chosen on validation"
            + (f" under {budget / 1e6:.4g} M MACs." if budget else "; give a budget to pick them."))
    return html.Div(id="compare-table", style=_CARD, children=[
        html.Table([html.Tr([html.Th(h, style={"textAlign": "left", "paddingRight": "10px"})
                             for h in figures.COMPARE_HEADER]),
                    *rows]), html.P(note, style={"color": "#555", "fontSize": "13px"}), *configs])


def serve(uri: str, cache_dir: Path | None, host: str = "127.0.0.1", port: int = 8050,
          refresh_s: float = 5.0, threads: int = 8) -> None:
    """Serve with gunicorn: one worker process (one cache shared by every page) with a thread per request."""
    from gunicorn.app.base import BaseApplication

    server = create_app(StudyCache(Tracker(uri), cache_dir), refresh_s).server

    class _Gunicorn(BaseApplication):
        def load_config(self):
            for key, value in {"bind": f"{host}:{port}", "workers": 1, "worker_class": "gthread",
                               "threads": threads, "timeout": 120, "loglevel": "warning",
                               "accesslog": None}.items():
                self.cfg.set(key, value)

        def load(self):
            return server

    where = f"[{host}]" if ":" in host else host
    print(f"dynastudy dashboard on http://{where}:{port}/ (tracking store {redact(uri)}); Ctrl-C stops it", flush=True)
    _Gunicorn().run()
