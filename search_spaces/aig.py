"""Search space of `aig` (methods.md section 8): depth, target rate t, lambda, Gumbel temperature tau and its
annealing, gate width d, initial open probability, the test-time cut-off on p_on, and the optimiser."""

from __future__ import annotations

from typing import Any

from search_spaces.common import optimizer
from trainables.models.cifar_resnet import DEPTHS


def space(trial: Any) -> None:
    trial.suggest_categorical("model.depth", list(DEPTHS))
    trial.suggest_float("model.target", 0.3, 0.9)
    trial.suggest_float("model.lam", 0.5, 8.0, log=True)
    trial.suggest_float("model.tau", 0.3, 5.0, log=True)
    if trial.suggest_categorical("model.anneal", ["none", "exponential"]) != "none":
        trial.suggest_float("model.tau_final", 0.1, 1.0, log=True)
    trial.suggest_categorical("model.gate_width", [8, 16, 32, 64])
    trial.suggest_float("model.init_open", 0.6, 0.95)
    trial.suggest_float("model.cutoff", 0.3, 0.7)
    optimizer(trial)
