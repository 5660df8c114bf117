"""TPE's own cost without Ray, MLflow or a database: N asks of the `nb201` space (6 categorical edges of 5
operations, two objectives) in Optuna's in-memory storage, with two trials running at a time (`constant_liar`),
as in benchmarks/sweep_overhead.py. Prints the cumulative ask time at 100, 500 and N trials, and Optuna's version.
The values told are random: the cost of TPE depends on the number of trials, not on their values.

    python benchmarks/optuna_ask.py --trials 1000
"""

from __future__ import annotations

import argparse
import random
import time

import optuna

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")  # trainables/methods/nb201.py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(a.seed)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=a.seed, constant_liar=True))
    running, asked_s = [], 0.0
    for i in range(1, a.trials + 1):
        t0 = time.perf_counter()
        trial = study.ask()
        for k in range(6):
            trial.suggest_categorical(f"nb201:model.ops.{k}", OPS)
        asked_s += time.perf_counter() - t0
        running.append(trial)
        if len(running) == 2:
            study.tell(running.pop(0), [rng.random(), rng.random()])
        if i in (100, 500, a.trials):
            print(f"optuna {optuna.__version__}: {i} asks, {asked_s:.1f} s in all", flush=True)


if __name__ == "__main__":
    main()
