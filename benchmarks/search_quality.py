"""Search quality on NAS-Bench-201 (CIFAR-10, validation accuracy vs latency): does dynastudy's Ray + Optuna path
find fronts as good as Optuna alone, and do the samplers beat random search?

Each run searches the 15,625 cells of `nb201` with 100 trials, for every sampler and seed, on two paths:
  dynastudy   `study.runner.run_sweep`, what `dynastudy sweep --method nb201 --objective latency_s` runs: Ray Tune
              trials (2 at a time, so suggestions are made while other trials are still out), Optuna on SQLite,
              every trial logged to MLflow (SQLite), `--ask-ahead` as given (default `auto`, as the command's).
              One local Ray serves all runs.
  optuna      plain Optuna in one process (in-memory storage, sequential), the same space function and sampler.
The hypervolume of each run's trials is taken against one fixed reference point (val_acc 0.70, latency 26 ms: the
table's slowest cell is 25.6 ms), in accuracy x milliseconds, and compared with the hypervolume of the true front
of the whole table. Every dynastudy trial's Optuna values are also checked against the table.

    python benchmarks/search_quality.py --seeds 10 --trials 100 --out /tmp/search-quality [--json r.json]
    python benchmarks/search_quality.py --paths optuna --samplers random nsga2 --population 20 --seeds 20 --out /tmp/q
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import optuna

from study.search import AHEAD_MODES, nsga2_population

REF_ACC, REF_LATENCY_MS = 0.70, 26.0
SAMPLERS = ("random", "tpe", "nsga2")


def hv(acc, latency_ms) -> float:
    from study.pareto import hypervolume

    return hypervolume(np.asarray(acc, float), np.asarray(latency_ms, float), REF_ACC, REF_LATENCY_MS)


def true_front_hv() -> tuple[float, int]:
    from study.pareto import non_dominated
    from trainables.methods import nb201

    df = nb201.table_frame("cifar10")
    acc, lat = df["val_acc"].to_numpy(), df["latency_s"].to_numpy() * 1e3
    return hv(acc, lat), int(non_dominated(acc, lat).sum())


def lookup(params: dict) -> dict:
    from study.search import config_keys
    from trainables.config import TrialConfig
    from trainables.methods import nb201

    return nb201.lookup(TrialConfig.from_flat({"method": "nb201", **config_keys(params)}).model)


def plain_optuna(sampler: str, seed: int, trials: int, population: int | None) -> tuple[float, float]:
    from study.search import SweepSpace, make_sampler

    space = SweepSpace(["nb201"], {"method": "nb201"})
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=make_sampler(sampler, seed, trials=trials, population=population))

    def objective(trial):
        space(trial)
        e = lookup(trial.params)
        return e["val_acc"], e["latency_s"]

    t0 = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    vals = np.array([t.values for t in study.trials])
    return hv(vals[:, 0], vals[:, 1] * 1e3), time.perf_counter() - t0


def dynastudy_path(sampler: str, seed: int, trials: int, out: Path, concurrency: int, ask_ahead: str,
                   population: int | None) -> tuple[float, float, int, int]:
    import contextlib
    import io

    from study.runner import SweepSpec, run_sweep

    name = f"{sampler}-{seed}"
    spec = SweepSpec(study=name, methods=("nb201",), trials=trials, fixed={"method": "nb201"}, results_dir=out,
                     tracking_uri=f"sqlite:///{out}/mlflow.db", storage=f"sqlite:///{out}/optuna.db",
                     concurrency=concurrency, sampler=sampler, seed=seed, objective="latency_s",
                     ask_ahead=ask_ahead, population=population if sampler == "nsga2" else None)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = run_sweep(spec)
    seconds = time.perf_counter() - t0
    if result.interrupted or result.count("complete") != trials:
        raise SystemExit(f"{name}: {result.count('complete')} of {trials} trials completed")
    study = optuna.load_study(study_name=name, storage=spec.storage)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    wrong = 0
    for t in done:  # the glue: what Optuna was told is the table's entry for the configuration it proposed
        e = lookup(t.params)
        wrong += not (math.isclose(t.values[0], e["val_acc"]) and math.isclose(t.values[1], e["latency_s"]))
    vals = np.array([t.values for t in done])
    return hv(vals[:, 0], vals[:, 1] * 1e3), seconds, wrong, result.asked_ahead


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error; NaN where there are too few values (a path not run: none)."""
    nan = float("nan")
    return (statistics.fmean(xs) if xs else nan), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else nan)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--ask-ahead", default="auto", choices=AHEAD_MODES)
    p.add_argument("--population", type=int, help="NSGA-II's population (default: the platform's, sized to --trials)")
    p.add_argument("--paths", nargs="+", default=["dynastudy", "optuna"], choices=["dynastudy", "optuna"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)

    from study.runner import _local_ray_env, init_ray

    if "dynastudy" in a.paths:
        _local_ray_env()
        init_ray(None)  # one local Ray for every run: run_sweep leaves a Ray it did not start running
    best, front_size = true_front_hv()
    print(f"true front: {front_size} cells, hypervolume {best:.4f} (accuracy x ms) against "
          f"(val_acc {REF_ACC}, latency {REF_LATENCY_MS} ms)", flush=True)
    runs: dict[str, dict[str, list]] = {}
    for sampler in a.samplers:
        r = runs.setdefault(sampler, {"dynastudy": [], "optuna": [], "dynastudy_s": [], "optuna_s": [], "wrong": 0,
                                      "asked_ahead": []})
        for seed in range(a.seeds):
            line = f"{sampler} seed {seed}:"
            if "dynastudy" in a.paths:
                h_dyn, s_dyn, wrong, ahead = dynastudy_path(sampler, seed, a.trials, a.out, a.concurrency,
                                                            a.ask_ahead, a.population)
                r["dynastudy"].append(h_dyn), r["dynastudy_s"].append(s_dyn)
                r["wrong"] += wrong
                r["asked_ahead"].append(ahead)
                line += f" dynastudy {h_dyn:.4f} ({s_dyn:.0f} s, {wrong} values off the table, {ahead} asked ahead)"
            if "optuna" in a.paths:
                h_opt, s_opt = plain_optuna(sampler, seed, a.trials, a.population)
                r["optuna"].append(h_opt), r["optuna_s"].append(s_opt)
                line += f" optuna {h_opt:.4f} ({s_opt:.1f} s)"
            print(line, flush=True)
    print(f"\nmachine: {platform.machine()}, {__import__('os').cpu_count()} CPUs, optuna {optuna.__version__}, "
          f"date {time.strftime('%Y-%m-%d')}; {a.seeds} seeds x {a.trials} trials; dynastudy concurrency "
          f"{a.concurrency}, ask ahead {a.ask_ahead}, NSGA-II population "
          f"{nsga2_population(a.trials, a.population)}; true front hypervolume {best:.4f}")
    print("| sampler | path | hypervolume mean ± SE | fraction of the true front | difference (dynastudy - optuna) "
          "in SE | s per run |")
    print("|---|---|---:|---:|---:|---:|")
    rows = []
    for sampler, r in runs.items():
        (md, sd), (mo, so) = mean_se(r["dynastudy"]), mean_se(r["optuna"])
        z = (md - mo) / math.hypot(sd, so) if sd == sd and so == so and (sd or so) else float("nan")
        for path, m, s, secs in (("dynastudy", md, sd, r["dynastudy_s"]), ("optuna", mo, so, r["optuna_s"])):
            if path not in a.paths:
                continue
            diff = f"{z:+.2f}" if z == z else "—"  # one path run: nothing to compare
            print(f"| {sampler} | {path} | {m:.4f} ± {s:.4f} | {m / best:.3f} | {diff} | "
                  f"{statistics.fmean(secs):.1f} |")
            rows.append({"sampler": sampler, "path": path, "mean": m, "se": s, "fraction": m / best,
                         "values": r[path], "seconds_mean": statistics.fmean(secs),
                         **({"asked_ahead": r["asked_ahead"]} if path == "dynastudy" else {})})
        if r["wrong"]:
            print(f"  {sampler}: {r['wrong']} dynastudy trials told Optuna values that are not the table's")
    if "random" in runs:  # seed for seed against random search, on each path ("must beat random search")
        for sampler, r in runs.items():
            for path in a.paths if sampler != "random" else ():
                d = [x - y for x, y in zip(r[path], runs["random"][path])]
                m, s = mean_se(d)
                print(f"{sampler} - random, {path} path, seed for seed: {m:+.4f} ± {s:.4f} ({m / s:+.2f} SE), "
                      f"higher in {sum(x > 0 for x in d)} of {len(d)} seeds")
    if a.json:
        a.json.write_text(json.dumps({"true_front_hv": best, "true_front_cells": front_size,
                                      "reference": [REF_ACC, REF_LATENCY_MS], "seeds": a.seeds, "trials": a.trials,
                                      "paths": a.paths, "concurrency": a.concurrency, "ask_ahead": a.ask_ahead,
                                      "rows": rows,
                                      "nsga2_population": nsga2_population(a.trials, a.population),
                                      "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform()},
                                     indent=1))


if __name__ == "__main__":
    main()
