"""Plain ResNet vs deep supervision (DSL) vs Dynamic Hierarchical Mimicking (DHM) at one training budget (issue 6).

Trains every method of --methods with every seed of --seeds through `dynastudy run` into one study (the same
data, epochs, schedule and backbone for all; DHM at its default alpha = 1, T = 1), then reads the results back
from MLflow and prints final-head (head 0) test accuracy per method as mean +- standard deviation over seeds,
with the range, the side heads' accuracy and the training MACs. A (method, seed) already finished in the study
is not trained again, so an interrupted benchmark continues where it stopped. `dynastudy pareto --study NAME`
then shows the methods side by side.

  python benchmarks/dhm_compare.py --data-dir ../shared/data --results-dir /tmp/dhm-bench \\
      [--seeds 0,1,2] [--depth 20] [--epochs 4] [--subset 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.tracking import TAG_HASH, TAG_KIND, TAG_METHOD, TAG_NOTES, Tracker  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402

METHODS = ("resnet", "dsl", "dhm")


def budget_keys(args) -> dict[str, str]:
    """The training budget every method shares (the config keys given to `dynastudy run`)."""
    keys = {"model.depth": args.depth, "model.shortcut": "A", "optim.epochs": args.epochs, "data.subset": args.subset,
            "data.val_size": args.val_size, "data.test_subset": args.test_subset, "optim.lr": args.lr,
            "optim.batch_size": args.batch_size, "optim.weight_decay": args.weight_decay}
    for item in args.set or []:
        k, _, v = item.partition("=")
        keys[k] = v
    return {k: str(v) for k, v in keys.items()}


def finished_runs(tracker: Tracker, study: str) -> list:
    exp = tracker.experiment_id(study)
    if exp is None:
        return []
    return tracker.client.search_runs([exp], f"tags.`{TAG_KIND}` = 'run' and attributes.status = 'FINISHED'",
                                      max_results=10000)


def budget_hash(method: str, keys: dict[str, str]) -> str:
    """The config hash of `method` under the shared budget (the hash leaves out the seed)."""
    return TrialConfig.from_flat({"method": method, **keys}).config_hash()


def runs_of(runs, method: str, keys: dict[str, str], seed: int | None = None) -> list:
    h = budget_hash(method, keys)
    return [r for r in runs if r.data.tags.get(TAG_METHOD) == method and r.data.tags.get(TAG_HASH) == h
            and (seed is None or r.data.params.get("seed") == str(seed))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("DYNASTUDY_DATA"))
    p.add_argument("--results-dir", required=True, help="results root of the study (absolute or relative)")
    p.add_argument("--study", default="dhm-compare")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--subset", type=int, default=10000, help="training images (class-balanced; 0 = all 45,000)")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--test-subset", type=int, default=0, help="test images (0 = all 10,000)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="another shared config key (repeatable)")
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods {','.join(bad)}: valid methods are {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    root = Path(args.results_dir).resolve()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    keys = budget_keys(args)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    tracker = Tracker(uri) if (root / "mlflow.db").exists() else None

    for method in methods:
        for seed in seeds:
            done = runs_of(finished_runs(tracker, args.study) if tracker else [], method, keys, seed)
            if done:
                print(f"{method} seed {seed}: finished before (run {done[0].info.run_id}), not retrained", flush=True)
                continue
            cmd = [sys.executable, "-m", "study.cli", "run", "--method", method, "--study", args.study,
                   "--results-dir", str(root), "--set", f"seed={seed}"]
            cmd += [a for k, v in keys.items() for a in ("--set", f"{k}={v}")]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            print(f"{method} seed {seed}: training", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[1])
            print(f"{method} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
            tracker = tracker or Tracker(uri)

    summary = summarize(tracker, finished_runs(tracker, args.study), keys, methods, seeds)
    summary.update(machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
                   budget=keys, study=args.study, tracking_uri=uri)
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


def summarize(tracker: Tracker, runs, keys: dict[str, str], methods, seeds) -> dict:
    per_method = {}
    for method in methods:
        rows = [r for r in runs_of(runs, method, keys) if int(r.data.params["seed"]) in seeds]
        if not rows:
            continue
        m = [r.data.metrics for r in rows]
        acc = [x["test_acc"] for x in m]
        entry = {"runs": len(rows), "seeds": sorted(int(r.data.params["seed"]) for r in rows),
                 "test_acc": acc, "test_acc_mean": statistics.fmean(acc),
                 "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                 "test_acc_min": min(acc), "test_acc_max": max(acc),
                 "val_acc_mean": statistics.fmean(x["val_acc"] for x in m),
                 "macs": m[0]["macs_full"], "train_macs": m[0]["train_macs"],
                 "train_time_s_mean": statistics.fmean(
                     sum(h.value for h in tracker.client.get_metric_history(r.info.run_id, "epoch_time_s"))
                     for r in rows),
                 "notes": [n for r in rows for n in r.data.tags.get(TAG_NOTES, "").splitlines() if n]}
        for h in (1, 2):
            key = f"test_acc_head_{h}"
            if all(key in x for x in m):
                entry[f"{key}_mean"] = statistics.fmean(x[key] for x in m)
        per_method[method] = entry
    return {"methods": per_method}


def print_summary(summary: dict) -> None:
    print(f"\n{'method':<7} {'runs':>4} {'test acc (head 0)':>20} {'range':>15} {'head 1':>7} {'head 2':>7} "
          f"{'MACs':>7} {'train MACs':>10} {'train s':>8}")
    for method, e in summary["methods"].items():
        h1 = f"{e['test_acc_head_1_mean']:.4f}" if "test_acc_head_1_mean" in e else "-"
        h2 = f"{e['test_acc_head_2_mean']:.4f}" if "test_acc_head_2_mean" in e else "-"
        print(f"{method:<7} {e['runs']:>4} {e['test_acc_mean']:>11.4f} +- {e['test_acc_std']:.4f} "
              f"{e['test_acc_min']:.4f}-{e['test_acc_max']:.4f} {h1:>7} {h2:>7} {e['macs'] / 1e6:>6.1f}M "
              f"{e['train_macs'] / 1e6:>9.1f}M {e['train_time_s_mean']:>8.0f}")
        for note in e["notes"]:
            print(f"  note: {note}")


if __name__ == "__main__":
    sys.exit(main())
