"""Search space of `resnet`: depth and the optimiser."""

from __future__ import annotations

from typing import Any

from search_spaces.common import optimizer
from trainables.models.cifar_resnet import DEPTHS


def space(trial: Any) -> None:
    trial.suggest_categorical("model.depth", list(DEPTHS))
    optimizer(trial)
