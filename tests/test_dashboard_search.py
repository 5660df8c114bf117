"""The search view against trial runs written to a real SQLite MLflow store by `study.tracking.Tracker`, read back
into the dashboard's run frame, with importance computed by Optuna in memory."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from dashboards import search
from dashboards.data import StudyCache
from study.tracking import TAG_STOPPED, Tracker
from trainables.config import TrialConfig

LRS = np.geomspace(1e-3, 0.3, 10)
DEPTHS = (20, 32, 56)


def runs_frame(tracker: Tracker, study: str) -> pd.DataFrame:
    """The dashboard's run summaries, as the data layer reads them."""
    return StudyCache(tracker, None).runs(study)


def _trial(tracker, exp, parent, study, flat, trial_id, metrics=None, status="FINISHED", kind="trial", stopped=False):
    run_id = tracker.start_trial(exp, parent, study, TrialConfig.from_flat(flat), trial_id, kind=kind)
    if metrics:
        tracker.log_metrics(run_id, metrics, step=1)
    if stopped:
        tracker.client.set_tag(run_id, TAG_STOPPED, "after epoch 1")
    if status != "RUNNING":
        tracker.finish(run_id, status)
    return run_id


def _acc(lr: float) -> float:
    return 0.9 - 0.1 * abs(math.log10(lr) + 2)  # depends on the learning rate only, best at 0.01


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_tracker):
    """Study "s": 10 complete elastic trials (val_acc from optim.lr only, MACs from model.depth only, model.weights
    irrelevant), one failed, one stopped early, one still running; 3 aig trials over model.target; and a single
    `dynastudy run` with a momentum nobody searched. Study "one": a single finished trial."""
    root = tmp_path_factory.mktemp("search")
    tracker = mlflow_tracker
    exp = tracker.ensure_experiment("s", root / "art")
    parent = tracker.start_sweep(exp, "s", {"trials": 16})
    for i, lr in enumerate(LRS):
        depth, weights = DEPTHS[i % 3], ("uniform", "linear")[i % 2]
        _trial(tracker, exp, parent, "s", {"method": "elastic", "optim.lr": float(lr), "model.depth": depth,
                                           "model.weights": weights}, f"e{i}",
               {"val_acc": _acc(lr), "macs": depth * 1e6})
    base = {"method": "elastic", "model.depth": 20}
    _trial(tracker, exp, parent, "s", {**base, "optim.lr": 0.02}, "fail", status="FAILED")
    _trial(tracker, exp, parent, "s", {**base, "optim.lr": 0.5}, "stop", {"val_acc": 0.1, "macs": 2e7}, stopped=True)
    _trial(tracker, exp, parent, "s", {**base, "optim.lr": 0.03}, "live", {"val_acc": 0.3, "macs": 2e7},
           status="RUNNING")
    for i, target in enumerate((0.4, 0.6, 0.8)):
        _trial(tracker, exp, parent, "s", {"method": "aig", "model.target": target}, f"a{i}",
               {"val_acc": 0.7 + 0.1 * target, "macs": target * 2e8})
    _trial(tracker, exp, None, "s", {**base, "optim.momentum": 0.5}, "single", {"val_acc": 0.5, "macs": 2e7},
           kind="run")
    exp1 = tracker.ensure_experiment("one", root / "art")
    _trial(tracker, exp1, tracker.start_sweep(exp1, "one", {}), "one", {"method": "elastic"}, "only",
           {"val_acc": 0.5, "macs": 2e7})
    return runs_frame(tracker, "s"), runs_frame(tracker, "one")


def test_searched_params_are_the_keys_that_vary(store):
    runs, _ = store
    assert search.param_kinds(runs, "elastic") == {"model.depth": "numeric", "model.weights": "categorical",
                                                   "optim.lr": "numeric"}
    assert search.searched_params(runs, "aig") == ["model.target"]
    # across methods: method, and the keys both have that some method searched (not weights or target, which
    # only one method has; not momentum, which only a single run outside the sweep changed)
    assert search.param_kinds(runs) == {"method": "categorical", "model.depth": "numeric", "optim.lr": "numeric"}


def test_importance_by_optuna_ranks_the_param_the_objective_depends_on(store):
    runs, _ = store
    acc = search.importances(runs, "elastic", "val_acc")
    macs = search.importances(runs, "elastic", "macs")
    for series in (acc, macs):
        assert set(series.index) == {"optim.lr", "model.depth", "model.weights"}
        assert series.sum() == pytest.approx(1.0) and (series >= 0).all()
        assert series.attrs["evaluator"] == "fANOVA" and series.attrs["trials"] == 10  # not failed/stopped/running
    assert acc.index[0] == "optim.lr" and acc["optim.lr"] > 0.5
    assert macs.index[0] == "model.depth" and macs["model.depth"] > 0.5
    assert search.importances(runs, "elastic", "val_acc").equals(acc)  # seeded: a refresh keeps the order
    across = search.importances(runs, None, "macs")
    assert set(across.index) == {"method", "model.depth", "optim.lr"} and across.attrs["trials"] == 13
    fig = search.importance_figure(acc, "val_acc")
    bars = fig.data[0]
    assert bars.orientation == "h" and list(bars.y)[-1] == "optim.lr"  # the top bar
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_scatter_has_one_point_per_finished_trial(store):
    runs, _ = store
    elastic = runs[runs["method"] == "elastic"]
    fig = search.param_scatter(elastic, "optim.lr", "val_acc")
    traces = {t.name: t for t in fig.data}
    assert len(traces["complete"].x) == 10 and len(traces["stopped early (last epoch)"].x) == 1
    assert sorted(traces["complete"].x) == pytest.approx(sorted(LRS))
    assert fig.layout.xaxis.type == "log"  # 1e-3..0.5 spans more than two decades
    # coloured by MACs, the other objective
    assert sorted(traces["complete"].marker.color) == sorted(DEPTHS[i % 3] * 1e6 for i in range(10))
    assert "MACs" in traces["complete"].marker.colorbar.title.text
    cat = search.param_scatter(elastic, "model.weights", "macs")
    assert list(cat.layout.xaxis.ticktext) == ["linear", "uniform"]
    assert sum(len(t.x) for t in cat.data if isinstance(t, go.Scatter)) == 11
    depth = search.param_scatter(elastic, "model.depth")
    assert depth.layout.xaxis.type != "log"


def test_search_figures_cover_every_method_and_say_when_there_are_too_few_trials(store):
    runs, one = store
    figures = dict(search.search_figures(runs))
    titles = list(figures)
    assert list(figures["all methods: method"].layout.xaxis.ticktext) == ["aig", "elastic"]
    assert figures["elastic: importance for val_acc"].layout.title.text.startswith("elastic: ")
    assert titles[:2] == ["all methods: importance for val_acc", "all methods: importance for macs"]
    assert "all methods: method" in titles and "all methods: optim.lr" not in titles  # keys go per method
    assert "elastic: optim.lr" in titles and "aig: model.target" in titles
    assert not any("momentum" in t or "seed" in t for t in titles)
    figures = search.search_figures(one)
    assert [t for t, _ in figures] == ["elastic: importance for val_acc", "elastic: importance for macs"]
    for _, fig in figures:
        assert not fig.data and "too few complete trials (1" in fig.layout.annotations[0].text
    assert search.importances(one, "elastic", "val_acc").empty
    assert "no trial runs" in search.search_figures(runs, "msdnet")[0][1].layout.annotations[0].text
