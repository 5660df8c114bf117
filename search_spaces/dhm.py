"""Search space of `dhm` (methods.md section 8): the branch network shared with `dsl` (depth, which forks exist,
head 1's width factor, the auxiliary cross-entropy weights), the mimicking weight alpha and temperature T, and
the optimiser."""

from __future__ import annotations

from typing import Any

from search_spaces.common import optimizer
from trainables.models.cifar_resnet import DEPTHS


def branch_network(trial: Any) -> dict[str, Any]:
    """Depth, fork placement, head 1's width and the CE weight of each side head present. An absent head's
    weight is set to 1 (unused), so every trial's config names both."""
    trial.suggest_categorical("model.depth", list(DEPTHS))
    forks = trial.suggest_categorical("model.branches", ["both", "stage2", "stage1"])
    constants = {}
    for index, head, present in ((0, 1, forks in ("both", "stage2")), (1, 2, forks in ("both", "stage1"))):
        if present:
            trial.suggest_float(f"model.aux_weights.{index}", 0.3, 1.0)
        else:
            constants[f"model.aux_weights.{index}"] = 1.0
    if forks != "stage1":
        trial.suggest_float("model.branch_width", 1.0, 2.0, step=0.5)
    return constants


def space(trial: Any) -> dict[str, Any]:
    constants = branch_network(trial)
    trial.suggest_float("model.alpha", 0.1, 4.0, log=True)
    trial.suggest_float("model.temperature", 1.0, 4.0)
    optimizer(trial)
    return constants
