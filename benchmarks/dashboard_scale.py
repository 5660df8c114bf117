"""How the dashboard's reads and figures scale with the number of trials in a study.

Fills a fresh MLflow store (SQLite, or --tracking-uri) with N finished trial runs laid out as sweeps write them
(the resolved config of a real `elastic` trial as params, the final metrics, a frontier of P points and config.yaml
as artifacts), then times what the dashboard does: the first read of the study (every run, every frontier), a
restart with the frontier cache on disk, a refresh when nothing changed, a refresh after 10 more trials, the
Pareto figure and its size on the wire, and the budget slider's patch.

    python benchmarks/dashboard_scale.py --trials 2000 --out /tmp/dash-scale [--json result.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd


def frontier(rng: np.random.Generator, points: int) -> pd.DataFrame:
    macs = np.sort(rng.uniform(5e6, 4.1e7, points))
    acc = np.clip(0.5 + 0.4 * macs / 4.1e7 + rng.normal(0, 0.03, points), 0, 1)
    return pd.DataFrame({
        "policy": "confidence", "param": rng.uniform(0.3, 1, points), "threshold": np.nan,
        "thresholds": json.dumps([0.9] * 8 + [-1e8]), "exit": -1, "operating": [True] + [False] * (points - 1),
        "overrides": "{}", "exit_fractions": json.dumps([1 / 9] * 9), "val_acc": acc, "macs": macs,
        "test_acc": acc - 0.01, "test_macs": macs})


def fill(tracker, study: str, root: Path, start: int, count: int, points: int, rng) -> None:
    from trainables.config import TrialConfig

    exp = tracker.ensure_experiment(study, root / "artifacts")
    parent = tracker.start_sweep(exp, study, {"trials": count})
    for i in range(start, start + count):
        cfg = TrialConfig.from_flat({"method": "elastic", "seed": i, "optim.lr": float(rng.uniform(0.01, 0.2)),
                                     "model.head_dropout": float(rng.uniform(0, 0.5))})
        run_id = tracker.start_trial(exp, parent, study, cfg, f"t{i:05d}")
        f = frontier(rng, points)
        op = f.iloc[0]
        tracker.log_metrics(run_id, {"train_loss": 1.0, "val_acc": op.val_acc}, step=1)
        tracker.log_metrics(run_id, {"val_acc": op.val_acc, "test_acc": op.test_acc, "macs": op.macs,
                                     "test_macs": op.test_macs}, step=2)
        tracker.log_artifacts(run_id, {"frontier.parquet": f})
        tracker.finish(run_id)
    tracker.finish(parent)


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--points", type=int, default=48, help="frontier points per trial (an elastic trial has ~50)")
    p.add_argument("--out", required=True, help="folder for the store and the frontier cache (emptied first)")
    p.add_argument("--tracking-uri", help="default: sqlite:///<out>/mlflow.db")
    p.add_argument("--json", help="write the figures here too")
    p.add_argument("--reuse", action="store_true", help="read the store this script filled before (each run adds 10)")
    args = p.parse_args()

    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from dashboards import figures
    from dashboards.data import StudyCache
    from study.tracking import Tracker

    out = Path(args.out).resolve()
    if not args.reuse:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    tracker = Tracker(args.tracking_uri or f"sqlite:///{out}/mlflow.db")
    rng = np.random.default_rng(0)
    fill_s = float("nan")
    if not args.reuse:
        _, fill_s = timed(lambda: fill(tracker, "scale", out, 0, args.trials, args.points, rng))
    shutil.rmtree(out / "cache", ignore_errors=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
              "store": tracker.uri.split(":")[0], "trials": args.trials, "points_per_trial": args.points,
              "fill_s": round(fill_s, 1)}

    cache = StudyCache(tracker, out / "cache", min_interval=0)
    points, s = timed(lambda: cache.points("scale"))
    result.update(first_read_s=round(s, 2), first_read_queries=cache.queries, points=len(points),
                  trials=points["run_id"].nunique())
    restart = StudyCache(tracker, out / "cache", min_interval=0)
    _, s = timed(lambda: restart.points("scale"))
    result.update(restart_read_s=round(s, 2))
    before = cache.queries
    _, s = timed(lambda: cache.refresh("scale", force=True))
    result.update(idle_refresh_s=round(s, 3), idle_refresh_queries=cache.queries - before)
    fill(tracker, "scale", out, len(cache.runs("scale")), 10, args.points, rng)
    before = cache.queries
    _, s = timed(lambda: cache.refresh("scale", force=True))
    result.update(refresh_10_new_s=round(s, 3), refresh_10_new_queries=cache.queries - before)
    points = cache.points("scale")
    budget = float(np.median(points["macs"]))
    fig, s = timed(lambda: figures.pareto_figure(points, "val", budget=budget))
    result.update(pareto_figure_s=round(s, 2))
    text, s = timed(fig.to_json)
    result.update(pareto_json_s=round(s, 2), pareto_json_mb=round(len(text) / 1e6, 2))
    patch, s = timed(lambda: [t.to_plotly_json() for t in figures.budget_traces(points, "val", budget * 0.8)])
    result.update(budget_patch_s=round(s, 3), budget_patch_kb=round(len(json.dumps(patch, default=float)) / 1e3, 1))
    table, s = timed(lambda: figures.compare_table(points, budget))
    result.update(compare_table_s=round(s, 2))
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
