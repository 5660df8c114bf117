"""Search space of `resnet`: depth, stochastic depth's final survival probability p_L (1 = off; methods.md
section 8: 0.3-1.0, the paper 0.5) and the optimiser. The drop mode is a setting (`--set model.drop_mode=...`)."""

from __future__ import annotations

from typing import Any

from search_spaces.common import optimizer
from trainables.models.cifar_resnet import DEPTHS


def space(trial: Any) -> None:
    trial.suggest_categorical("model.depth", list(DEPTHS))
    trial.suggest_float("model.survival_last", 0.3, 1.0)
    optimizer(trial)
