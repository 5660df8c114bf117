"""Platform overhead of a sweep, measured as Ray does for its own (10,000 one-second trials on one node): N trials
that only sleep a fixed duration, through the full `dynastudy sweep` path (local Ray, Optuna on SQLite, MLflow on
SQLite, every trial logged as usual), against the minimum N x duration / concurrency.

The trials are `nb201` with `model.sim_seconds` = the duration: a table lookup, then the sleep. Reported: the
command's wall time (Ray's start and shutdown included) and the sweep's own time (from loading to the last
trial), the overhead in total and per trial, and where it goes: Optuna's suggest and tell on the driver (the
sweep run's `optuna_*_s` metrics); per trial its setup before `fit`, the time to open its MLflow run (in a
thread, while the trial starts) and how long the trial waited for it, queueing its final metrics and files, the
wait at its end for its MLflow writes and its whole `fit` (the sweep run's `trial_*_mean` metrics, and their
medians from Tune's result files); and the hand-over between two trials on one actor: from one trial's last
report to the next trial's start (Tune's result files: each trial's `t_start`, `t_end` and process).

The same N trials through plain Ray Tune (a function that sleeps and reports, no Optuna, no MLflow, Tune's file
loggers off, actors reused, Ray started and stopped in the run) give Ray's own overhead on the same machine: the
floor under dynastudy's figure (`--floor`).

    python benchmarks/sweep_overhead.py --trials 100 1000 --duration 1 --concurrency 2 --floor --out /tmp/overhead
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

from study.search import AHEAD_MODES


def run(trials: int, duration: float, concurrency: int, out: Path, sampler: str, cpus: float,
        ask_ahead: str = "auto") -> dict:
    from study.cli import main
    from study.tracking import TAG_KIND, Tracker

    if out.exists():
        shutil.rmtree(out)
    args = [*sweep_args("overhead", trials, duration, concurrency, sampler, out), "--cpus-per-trial", str(cpus),
            "--ask-ahead", ask_ahead]
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        code = main(args)
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"sweep failed ({code}):\n{log.getvalue()[-3000:]}")
    tracker = Tracker(f"sqlite:///{out}/mlflow.db")
    exp = tracker.experiment_id("overhead")
    (sweep,) = tracker.client.search_runs([exp], filter_string=f"tags.`{TAG_KIND}` = 'sweep'")
    runs = tracker.client.search_runs([exp], filter_string=f"tags.`{TAG_KIND}` != 'sweep'", max_results=50000)
    m = sweep.data.metrics
    minimum = trials * duration / concurrency

    fig = {
        "trials": trials, "duration_s": duration, "concurrency": concurrency, "sampler": sampler,
        "ask_ahead": ask_ahead, "asked_ahead": m.get("trials_asked_ahead"), "optuna_ahead_s": m.get("optuna_ahead_s"),
        "finished_runs": sum(r.info.status == "FINISHED" for r in runs), "minimum_s": minimum,
        "wall_s": wall, "sweep_s": m["sweep_time_s"],
        "overhead_total_pct": 100 * (wall - minimum) / minimum,
        "overhead_sweep_pct": 100 * (m["sweep_time_s"] - minimum) / minimum,
        "overhead_per_trial_s": (wall - minimum) * concurrency / trials,
        "optuna_suggest_s": m.get("optuna_suggest_s"), "optuna_tell_s": m.get("optuna_tell_s"),
        **{k: m.get(k) for k in ("optuna_writes_queued", "optuna_db_transactions")},
        **{k: m.get(k) for k in ("trial_setup_s_mean", "trial_open_s_mean", "trial_open_wait_s_mean",
                                 "trial_final_s_mean", "trial_end_wait_s_mean", "trial_fit_s_mean")},
        "handover_s_mean": handover(results := final_results(out / "ray")),
        "trial_medians_s": trial_medians(results),
    }
    return fig


def sweep_args(study: str, trials: int, duration: float, concurrency: int, sampler: str, out: Path) -> list[str]:
    """`dynastudy sweep` of `trials` nb201 trials that sleep `duration` seconds (benchmarks/handover.py too)."""
    return ["sweep", "--method", "nb201", "--study", study, "--trials", str(trials), "--concurrency",
            str(concurrency), "--sampler", sampler, "--set", f"model.sim_seconds={duration}", "--results-dir",
            str(out)]


def final_results(tune_dir: Path) -> list[dict]:
    """Each trial's final result from Tune's result files: the one with its `t_start` and `t_end`."""
    return [r for f in tune_dir.glob("*/*/result.json") for r in map(json.loads, f.read_text().splitlines())
            if "t_start" in r and "t_end" in r]


def handover(results: list[dict]) -> float | None:
    """Mean time from a trial's end (its last report) to the start of the next trial on the same actor process."""
    by_pid = collections.defaultdict(list)
    for r in results:
        by_pid[r["pid"]].append((r["t_start"], r["t_end"]))
    gaps = [b[0] - a[1] for runs in map(sorted, by_pid.values()) for a, b in zip(runs, runs[1:])]
    return sum(gaps) / len(gaps) if gaps else None


def trial_medians(results: list[dict]) -> dict[str, float]:
    """Medians of what the trials report of their own time: unlike the sweep run's means, not raised by each
    actor's first trial (its imports, the table's load)."""
    from study.runner import TRIAL_TIMING  # not at the top: torch comes with it, and `run` times the imports

    return {k: statistics.median(v) for k in TRIAL_TIMING if (v := [r[k] for r in results if k in r])}


def ray_floor(trials: int, duration: float, concurrency: int, out: Path) -> dict:
    """Plain Ray Tune, in a fresh interpreter (its own Ray, started and stopped there)."""
    import subprocess
    import sys

    code = f"""
import collections, os, time
os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
t0 = time.perf_counter()
import ray
from ray import tune
def f(config):
    t_start = time.time()
    time.sleep({duration})
    tune.report({{"val_acc": 0.5, "macs": 1.0, "t_start": t_start, "t_end": time.time(), "actor": os.getpid()}})
ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
results = tune.Tuner(tune.with_resources(f, {{"cpu": 1}}), param_space={{"x": tune.uniform(0, 1)}},
           tune_config=tune.TuneConfig(num_samples={trials}, max_concurrent_trials={concurrency}, reuse_actors=True),
           run_config=tune.RunConfig(storage_path="{out}", verbose=0)).fit()
ray.shutdown()
wall = time.perf_counter() - t0
by_actor = collections.defaultdict(list)
for r in results:
    by_actor[r.metrics["actor"]].append((r.metrics["t_start"], r.metrics["t_end"]))
gaps = [b[0] - a[1] for runs in by_actor.values() for a, b in zip(sorted(runs), sorted(runs)[1:])]
print(sum(gaps) / len(gaps), wall)
"""
    if out.exists():
        shutil.rmtree(out)
    gap, wall = map(float, subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                          text=True).stdout.strip().splitlines()[-1].split())
    minimum = trials * duration / concurrency
    return {"trials": trials, "wall_s": wall, "minimum_s": minimum,
            "overhead_total_pct": 100 * (wall - minimum) / minimum,
            "overhead_per_trial_s": (wall - minimum) * concurrency / trials, "handover_s_mean": gap}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, nargs="+", default=[100])
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--sampler", default="tpe")
    p.add_argument("--ask-ahead", default="auto", choices=AHEAD_MODES, help="dynastudy sweep --ask-ahead")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--floor", action="store_true", help="also run the same trials through plain Ray Tune")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    rows, floors = [], []
    for n in a.trials:
        if a.floor:
            floors.append(ray_floor(n, a.duration, a.concurrency, a.out / f"floor{n}"))
            print(json.dumps({"ray_floor": floors[-1]}), flush=True)
        fig = run(n, a.duration, a.concurrency, a.out / f"n{n}", a.sampler, a.cpus_per_trial, a.ask_ahead)
        rows.append(fig)
        print(json.dumps(fig), flush=True)
    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, {__import__('os').cpu_count()} CPUs, "
          f"python {platform.python_version()}, date {time.strftime('%Y-%m-%d')}")
    print("| N | minimum | wall (command) | overhead | sweep | overhead (sweep) | per trial | Optuna suggest + tell "
          "| asked ahead (their asks) | trial: open run (waited) | trial: end wait | trial: fit (sleep incl.) "
          "| hand-over |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['trials']} | {r['minimum_s']:.0f} s | {r['wall_s']:.1f} s | {r['overhead_total_pct']:.1f} % | "
              f"{r['sweep_s']:.1f} s | {r['overhead_sweep_pct']:.1f} % | {r['overhead_per_trial_s']:.3f} s | "
              f"{r['optuna_suggest_s']:.1f} + {r['optuna_tell_s']:.1f} s | {r['asked_ahead'] or 0:.0f} "
              f"({r['optuna_ahead_s'] or 0:.1f} s) | {r['trial_open_s_mean']:.3f} s "
              f"({r['trial_open_wait_s_mean']:.3f} s) | {r['trial_end_wait_s_mean']:.3f} s | "
              f"{r['trial_fit_s_mean']:.3f} s | {r['handover_s_mean']:.3f} s |")
    for r in rows:  # inside the trial: the means above, and medians (each actor's first trial does not weigh)
        med = r["trial_medians_s"]
        print(f"N = {r['trials']}, in each trial, mean / median: setup before fit {r['trial_setup_s_mean']:.4f} / "
              f"{med['setup_s']:.4f} s, final metrics and files queued {r['trial_final_s_mean']:.4f} / "
              f"{med['final_s']:.4f} s, end wait {r['trial_end_wait_s_mean']:.4f} / {med['end_wait_s']:.4f} s, "
              f"fit (sleep incl.) {r['trial_fit_s_mean']:.4f} / {med['fit_s']:.4f} s")
    for f in floors:
        print(f"plain Ray Tune, N = {f['trials']}: {f['wall_s']:.1f} s for a minimum of {f['minimum_s']:.0f} s: "
              f"{f['overhead_total_pct']:.1f} % ({f['overhead_per_trial_s']:.3f} s per trial; hand-over "
              f"{f['handover_s_mean']:.3f} s)")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "ray_floor": floors, "machine": platform.platform(),
                                      "cpus": __import__("os").cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")},
                                     indent=1))


if __name__ == "__main__":
    main()
