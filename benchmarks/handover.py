"""Where the hand-over between two trials on one actor goes: from one trial's last report to the next trial's start
on the same actor, as a timeline of the driver's events (BENCHMARKS.md, platform overhead).

    python benchmarks/handover.py --trials 200 --sampler random --out /tmp/handover          # dynastudy sweep
    python benchmarks/handover.py --trials 200 --plain floor --out /tmp/handover-plain       # plain Ray Tune
    python benchmarks/handover.py --trials 200 --plain params,search,result --out /tmp/h2    # ... plus parts of ours

The dynastudy run is the full `dynastudy sweep` path of benchmarks/sweep_overhead.py (nb201 trials that sleep
one second, 2 at a time), with the driver's events timed by patching, in this process only: Tune's callbacks
(the final result received, the trial complete, the next trial started), the searcher's tell and suggest, and
Tune's saves of the experiment state. Each event is given in ms after the trial's end (its `t_end`); the last
line is the next trial's start on the actor (`t_start`). The plain runs are a bare Tune function that sleeps
and reports, with Ray started as dynastudy starts it; `--plain` adds parts of dynastudy's trial one by one:
`params` (`tune.with_parameters` of an object), `search` (our StudySearch with random sampling on an in-memory
study), `result` (a result of ~60 keys).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

EVENTS: dict[str, dict[str, float]] = collections.defaultdict(dict)  # trial id -> event -> wall time
SAVES: list[tuple[float, float]] = []  # Tune's saves of the experiment state (start, end)


def _callback_class():
    from ray.tune.logger import JsonLoggerCallback

    class Trace(JsonLoggerCallback):  # also Tune's JSON log: the sweep's callback list keeps one
        def on_trial_result(self, iteration, trials, trial, result, **info):
            EVENTS[trial.trial_id]["result received"] = time.time()
            super().on_trial_result(iteration, trials, trial, result, **info)

        def on_trial_complete(self, iteration, trials, trial, **info):
            EVENTS[trial.trial_id]["trial complete"] = time.time()
            super().on_trial_complete(iteration, trials, trial, **info)

        def on_trial_start(self, iteration, trials, trial, **info):
            EVENTS[trial.trial_id]["next started (driver)"] = time.time()
            super().on_trial_start(iteration, trials, trial, **info)

    return Trace


def _patch_driver() -> None:
    import ray.tune.execution.tune_controller as controller
    import ray.tune.logger as tune_logger

    import study.searcher as searcher

    tune_logger.JsonLoggerCallback = _callback_class()  # study.runner imports it from there when the sweep runs
    save, suggest, complete = (controller.TuneController.save_to_dir, searcher.StudySearch.suggest,
                               searcher.StudySearch.on_trial_complete)

    def timed_save(self, *a, **k):
        t0 = time.time()
        try:
            return save(self, *a, **k)
        finally:
            SAVES.append((t0, time.time()))

    def timed_suggest(self, trial_id):
        t0 = time.time()
        try:
            return suggest(self, trial_id)
        finally:
            EVENTS[trial_id].update({"suggest begins": t0, "suggest ends": time.time()})

    def timed_complete(self, trial_id, result=None, error=False):
        t0 = time.time()
        try:
            return complete(self, trial_id, result, error)
        finally:
            EVENTS[trial_id].update({"tell begins": t0, "tell ends": time.time()})

    controller.TuneController.save_to_dir = timed_save
    searcher.StudySearch.suggest, searcher.StudySearch.on_trial_complete = timed_suggest, timed_complete


def dynastudy(trials: int, sampler: str, out: Path) -> list[tuple[float, float, str]]:
    """The sweep; returns each trial's (t_start, t_end, trial id) per actor process, from Tune's result files."""
    import contextlib
    import io

    from sweep_overhead import final_results, sweep_args

    _patch_driver()
    from study.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(sweep_args("handover", trials, 1.0, 2, sampler, out))
    if code != 0:
        raise SystemExit(f"sweep failed ({code})")
    return [(r["pid"], r["t_start"], r["t_end"], r["trial_id"]) for r in final_results(out / "ray")]


def plain(trials: int, parts: set[str], out: Path) -> list[tuple[float, float, str]]:
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray
    from ray import tune

    from study.runner import init_ray

    def f(config, env=None):
        t_start = time.time()
        time.sleep(1)
        r = {"val_acc": 0.5, "macs": 1.0, "t_start": t_start, "actor": os.getpid()}
        if "result" in parts:
            r.update({f"m{i}": float(i) for i in range(60)})
        r["t_end"] = time.time()
        tune.report(r)

    _patch_driver()
    init_ray(None)
    trainable = tune.with_parameters(f, env={"x": list(range(1000))}) if "params" in parts else f
    search, space = {}, {"x": tune.uniform(0, 1)}
    if "search" in parts:
        import optuna

        from study.search import SweepSpace, make_sampler
        from study.searcher import StudySearch

        search = {"search_alg": StudySearch(space=SweepSpace(["nb201"], {"method": "nb201"}),
                                            metric=["val_acc", "macs"], mode=["max", "min"],
                                            sampler=make_sampler("random", 0),
                                            storage=optuna.storages.InMemoryStorage(), study_name="s")}
        space = None
    results = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space=space,
                         tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=2, reuse_actors=True,
                                                     **search),
                         run_config=tune.RunConfig(storage_path=str(out), verbose=0,
                                                   callbacks=[_callback_class()()])).fit()
    ray.shutdown()
    return [(r.metrics["actor"], r.metrics["t_start"], r.metrics["t_end"], r.metrics["trial_id"]) for r in results]


def timeline(runs: list[tuple]) -> None:
    by_actor = collections.defaultdict(list)
    for actor, t_start, t_end, trial in runs:
        by_actor[actor].append((t_start, t_end, trial))
    rows, gaps = collections.defaultdict(list), []
    for seq in by_actor.values():
        seq.sort()
        for (_, end_a, a), (start_b, _, b) in zip(seq, seq[1:]):
            saved = any(s0 < start_b and s1 > end_a for s0, s1 in SAVES)
            gaps.append((start_b - end_a, saved))
            for name in ("result received", "tell begins", "tell ends", "trial complete"):
                if name in EVENTS[a]:
                    rows[name].append(EVENTS[a][name] - end_a)
            for name in ("suggest begins", "suggest ends", "next started (driver)"):
                if name in EVENTS[b]:
                    rows[name].append(EVENTS[b][name] - end_a)
            rows["next started (actor)"].append(start_b - end_a)
    print(f"{len(gaps)} hand-overs; ms after the trial's end:")
    print("| event | median | mean |\n|---|---:|---:|")
    for name, v in sorted(rows.items(), key=lambda kv: statistics.median(kv[1])):
        print(f"| {name} | {1e3 * statistics.median(v):.1f} | {1e3 * statistics.fmean(v):.1f} |")
    if SAVES:
        d = [s1 - s0 for s0, s1 in SAVES]
        hit = [g for g, s in gaps if s]
        print(f"Tune saved its experiment state {len(d)} times, {1e3 * statistics.fmean(d):.0f} ms each on average; "
              f"{len(hit)} hand-overs overlapped a save")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--sampler", default="random", help="dynastudy sweep --sampler")
    p.add_argument("--plain", help="plain Ray Tune instead: 'floor', or parts of ours joined by commas: "
                                   "params, search, result")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    from study.runner import _local_ray_env

    _local_ray_env()  # before anything imports Ray: a local Ray bound to loopback, as the sweep's
    if a.out.exists():
        shutil.rmtree(a.out)
    t0 = time.perf_counter()
    if a.plain:
        parts = set(a.plain.split(",")) - {"floor"}
        unknown = parts - {"params", "search", "result"}
        if unknown:
            raise SystemExit(f"--plain: unknown parts {sorted(unknown)}; valid: floor, params, search, result")
        runs = plain(a.trials, parts, a.out)
    else:
        runs = dynastudy(a.trials, a.sampler, a.out)
    print(f"{'plain Ray Tune (' + a.plain + ')' if a.plain else 'dynastudy sweep, ' + a.sampler}: {a.trials} trials "
          f"in {time.perf_counter() - t0:.1f} s; machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"date {time.strftime('%Y-%m-%d')}")
    timeline(runs)


if __name__ == "__main__":
    main()
