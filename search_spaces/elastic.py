"""Search space of `elastic` (methods.md section 8): depth, loss-weight scheme (uniform, linear in depth, or an
independent weight per intermediate exit on a log scale, the final exit's weight fixed at 1), head dropout,
the exit policy's operating point (the confidence threshold unless policy.name is fixed), and the optimiser."""

from __future__ import annotations

from typing import Any

from search_spaces.common import optimizer, policy
from trainables.models.cifar_resnet import DEPTHS, blocks_per_stage


def space(trial: Any) -> dict[str, Any] | None:
    depth = trial.suggest_categorical("model.depth", list(DEPTHS))
    scheme = trial.suggest_categorical("model.weights", ["uniform", "linear", "independent"])
    trial.suggest_float("model.head_dropout", 0.0, 0.5)
    policy(trial)
    optimizer(trial)
    if scheme == "independent":
        exits = 3 * blocks_per_stage(depth)
        for k in range(exits - 1):
            trial.suggest_float(f"model.exit_weights.{k}", 0.1, 1.0, log=True)
        return {f"model.exit_weights.{exits - 1}": 1.0}
    return None
