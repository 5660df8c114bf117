"""The dashboard's data layer, figures and static report over a real MLflow store (SQLite in tmp_path) holding
trial runs laid out as sweeps write them; the browser test (test_dashboard_browser.py) drives the served page."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dashboards import figures
from dashboards.data import StudyCache, load_trial
from dashboards.report import write_report
from study import queries
from study.tracking import Tracker
from trainables.config import TrialConfig
from trainables.hparams import ConfigError

from stack import cli


def _frontier(rng, n: int, scale: float) -> pd.DataFrame:
    """Frontier rows with the columns `trainables.policies.frontier` writes."""
    macs = np.sort(rng.uniform(0.2, 1.0, n)) * scale
    acc = np.clip(0.3 + 0.5 * macs / scale + rng.normal(0, 0.05, n), 0, 1)
    return pd.DataFrame({
        "policy": ["static"] * 2 + ["confidence"] * (n - 2), "param": [np.nan] * 2 + list(rng.uniform(0, 1, n - 2)),
        "threshold": np.nan, "thresholds": ["[]"] * 2 + ["[0.5, 0.5, -100000000.0]"] * (n - 2),
        "exit": list(range(2)) + [-1] * (n - 2), "operating": [True] + [False] * (n - 1), "overrides": "{}",
        "exit_fractions": "[]", "val_acc": acc, "macs": macs, "test_acc": acc - 0.01, "test_macs": macs * 1.01})


class Store:
    """A study in a real tracking store, with trial runs added one by one."""

    def __init__(self, tracker: Tracker, root, study: str) -> None:
        self.root, self.study = root, study
        self.tracker, self.uri = tracker, tracker.uri
        self.exp = self.tracker.ensure_experiment(study, root / "artifacts")
        self.parent = self.tracker.start_sweep(self.exp, study, {"trials": 8})
        self.rng = np.random.default_rng(0)
        self.count = 0

    def trial(self, method: str, finish: bool = True, points: int = 6, **keys) -> str:
        self.count += 1
        cfg = TrialConfig.from_flat({"method": method, "seed": self.count, **keys})
        run_id = self.tracker.start_trial(self.exp, self.parent, self.study, cfg, f"t{self.count:03d}")
        frontier = _frontier(self.rng, points, 4e7 if method == "resnet" else 2e7)
        self.tracker.log_metrics(run_id, {"train_loss": 2.0, "val_acc": 0.3}, step=1)
        if finish:
            op = frontier.iloc[0]
            self.tracker.log_metrics(run_id, {"val_acc": op.val_acc, "test_acc": op.test_acc, "macs": op.macs,
                                              "test_macs": op.test_macs}, step=2)
            self.tracker.log_artifacts(run_id, {"frontier.parquet": frontier})
            self.tracker.finish(run_id)
        return run_id


@pytest.fixture
def store(request, tmp_path, mlflow_tracker):
    """A study of its own (named after the test) with two elastic trials and a resnet one."""
    s = Store(mlflow_tracker, tmp_path, request.node.name.replace("test_", "d-"))
    for lr in (0.05, 0.1):
        s.trial("elastic", **{"optim.lr": lr})
    s.trial("resnet")
    return s


def test_cache_reads_a_study_once_then_only_what_changed(store, tmp_path):
    cache = StudyCache(store.tracker, tmp_path / "cache", min_interval=0)
    points = cache.points(store.study)
    assert points["run_id"].nunique() == 3 and len(points) == 18 and cache.queries == 1
    reference = queries.frontier_points(store.tracker, store.study)
    key = ["run_id", "macs", "val_acc"]
    pd.testing.assert_frame_equal(points[key].sort_values(key).reset_index(drop=True),
                                  reference[key].sort_values(key).reset_index(drop=True))
    version = cache.version(store.study)
    assert cache.version(store.study) == version  # nothing new: same version, the same frame object
    assert cache.points(store.study) is cache.points(store.study)

    # A new finished trial and a running one: two small queries per refresh, one frontier read (in place: the
    # artifacts are on this disk, so nothing is copied into the cache).
    assert cache.frontiers == 3
    before = cache.queries
    new = store.trial("elastic", **{"optim.lr": 0.2})
    running = store.trial("resnet", finish=False)
    assert cache.version(store.study) == version + 1 and cache.queries == before + 2 and cache.frontiers == 4
    assert not (tmp_path / "cache").exists()
    runs = cache.runs(store.study)
    assert dict(zip(runs["run_id"], runs["status"]))[running] == "RUNNING"
    assert set(cache.points(store.study)["run_id"]) == set(reference["run_id"]) | {new}

    # The running trial finishes: it joins the plot at the next refresh.
    store.tracker.log_artifacts(running, {"frontier.parquet": _frontier(store.rng, 4, 4e7)})
    store.tracker.finish(running)
    assert cache.version(store.study) == version + 2 and running in set(cache.points(store.study)["run_id"])


def test_min_interval_bounds_how_often_mlflow_is_asked(store):
    cache = StudyCache(store.tracker, None, min_interval=3600)
    cache.points(store.study)
    asked = cache.queries
    store.trial("resnet")
    cache.points(store.study), cache.runs(store.study), cache.version(store.study)
    assert cache.queries == asked
    cache.refresh(store.study, force=True)
    assert cache.queries == asked + 2 and cache.points(store.study)["run_id"].nunique() == 4


def test_unknown_study_names_the_known_ones(store):
    with pytest.raises(ConfigError, match=f"no study named 'nope'.*studies there: .*{store.study}"):
        StudyCache(store.tracker, None).points("nope")


def test_pareto_figure_fronts_budget_and_best_match_the_queries(store):
    points = StudyCache(store.tracker, None).points(store.study)
    budget = float(np.median(points["macs"]))
    fig = figures.pareto_figure(points, "val", budget=budget)
    names = [t.name for t in fig.data]
    assert names == ["points: elastic", "front: elastic", "points: resnet", "front: resnet", "budget",
                     "best under budget"]
    by_name = {t.name: t for t in fig.data}
    assert len(by_name["points: elastic"].x) == 12 and len(by_name["points: resnet"].x) == 6
    for method in ("elastic", "resnet"):
        front = queries.pareto(points[points["method"] == method]).front
        assert list(by_name[f"front: {method}"].x) == front["macs"].tolist()
    best = queries.best_point(points, max_macs=budget)
    star = by_name["best under budget"]
    assert list(star.x) == [best["macs"]] and list(star.y) == [best["val_acc"]]
    assert list(star.customdata) == [best["run_id"]]
    assert fig.layout.xaxis.type == "log" and "MACs" in fig.layout.xaxis.title.text

    # Test split: test accuracy vs test MACs; the best point is still chosen on validation.
    test = {t.name: t for t in figures.pareto_figure(points, "test", budget=budget).data}
    assert list(test["best under budget"].y) == [best["test_acc"]]
    assert list(test["best under budget"].x) == [best["test_macs"]]
    # No point fits: an empty star, and a front point's hover names the key hyperparameter that varies (optim.lr).
    assert len({t.name: t for t in figures.pareto_figure(points, "val", budget=1.0).data}["best under budget"].x) == 0
    assert all("optim.lr" in by_name[t].text[0] for t in ("front: elastic", "points: elastic"))
    # Beyond FULL_HOVER_POINTS the dots carry a short hover; fronts and the star keep the full one.
    short = {t.name: t for t in figures.pareto_figure(points, "val", budget=budget, full_hover_points=10).data}
    assert all(text.startswith("elastic t") and "optim.lr" not in text for text in short["points: elastic"].text)
    assert all("optim.lr" in text for text in short["front: elastic"].text)


def test_compare_table_hypervolumes_against_one_reference(store, tmp_path):
    other = Store(store.tracker, tmp_path, study=store.study + "-2")
    other.trial("resnet")
    cache = StudyCache(store.tracker, None)
    one = cache.points(store.study)
    both = pd.concat([one, StudyCache(other.tracker, None).points(other.study)], ignore_index=True)
    table, ref = figures.compare_table(one, budget=3e7)
    assert ref == pytest.approx(1.1 * one["macs"].max())
    for row in table.itertuples():
        expect = queries.pareto(one[one["method"] == row.group], ref_macs=ref)
        assert row.hypervolume == pytest.approx(expect.hypervolume) and row.front == len(expect.front)
        best = queries.best_point(one[one["method"] == row.group], max_macs=3e7)
        assert row.best_run == best["run_id"] and row.config == queries.point_config(best)
    groups = figures.group_of(both)
    a, b = store.study, other.study
    assert set(groups) == {f"{a}/elastic", f"{a}/resnet", f"{b}/resnet"}


def test_load_trial_reads_curves_and_tables(store):
    run_id = store.trial("elastic", **{"optim.lr": 0.3})
    t = load_trial(store.tracker, run_id)
    assert t.method == "elastic" and t.status == "FINISHED" and t.params["optim.lr"] == 0.3
    assert t.histories["train_loss"] == [(1, 2.0)] and [s for s, _ in t.histories["val_acc"]] == [1, 2]
    assert set(t.tables) == {"frontier"} and len(t.tables["frontier"]) == 6


def test_report_writes_a_self_contained_page_and_pngs(store, tmp_path):
    cache = StudyCache(store.tracker, None)
    out = tmp_path / "report"
    files = write_report(cache, [store.study], out, budget=2e7)
    assert sorted(f.name for f in files) == ["compare.png", f"pareto-{store.study}-test.png",
                                              f"pareto-{store.study}-val.png", "report.html"]
    page = (out / "report.html").read_text()
    assert "<script src=\"http" not in page and "Plotly.newPlot" in page  # plotly.js inlined, no network
    assert page.count("Plotly.newPlot") == 3 and "front: elastic" in page and "dynastudy best" in page
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".report-*"))


def test_report_and_dashboard_refuse_bad_input_in_one_line(store, tmp_path, capsys):
    uri = ["--tracking-uri", store.uri]
    empty = Store(store.tracker, tmp_path, study=store.study + "-fresh")
    empty.trial("resnet", finish=False)
    cases = [
        (["report", "--study", "nope", "--out", str(tmp_path / "r1"), *uri], "no study named 'nope'"),
        (["report", "--study", store.study, "--out", str(tmp_path / "missing" / "r"), *uri], "does not exist"),
        (["report", "--study", empty.study, "--out", str(tmp_path / "r2"), *uri],
         "no finished trial with a frontier yet"),
        (["report", "--study", store.study, "--out", str(tmp_path / "r3"), "--max-macs", "-5", *uri],
         "--max-macs -5"),
        (["dashboard", "--port", "70000", *uri], "--port 70000 is not a port"),
        (["dashboard", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"], "no tracking store"),
    ]
    for args, message in cases:
        code, _, err = cli(capsys, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not any((tmp_path / n).exists() for n in ("r1", "r2", "r3", "none.db"))


def test_cli_report_prints_what_it_wrote(store, tmp_path, capsys):
    code, out, err = cli(capsys, "report", "--study", store.study, "--out", str(tmp_path / "shared"),
                          "--tracking-uri", store.uri)
    assert code == 0, err
    assert out.split() == [str(tmp_path / "shared" / n) for n in
                           ("compare.png", f"pareto-{store.study}-test.png", f"pareto-{store.study}-val.png",
                            "report.html")]


def test_frontiers_off_this_disk_are_downloaded_once_into_the_cache(store, tmp_path):
    """Without a local artifact path (a remote tracking server) a frontier is downloaded through MLflow, cached by
    run id, and read from the cache afterwards."""
    run = store.tracker.client.search_runs([store.exp], "tags.`dynastudy.method` = 'resnet'")[0]
    local = queries.frontier_of(store.tracker, run.info.run_id, None, run.info.artifact_uri)
    downloaded = queries.frontier_of(store.tracker, run.info.run_id, tmp_path / "c")
    assert (tmp_path / "c" / f"{run.info.run_id}.parquet").is_file()
    pd.testing.assert_frame_equal(downloaded, local)
    local.head(1).to_parquet(tmp_path / "c" / f"{run.info.run_id}.parquet")  # what only the cache holds
    assert len(queries.frontier_of(store.tracker, run.info.run_id, tmp_path / "c")) == 1
