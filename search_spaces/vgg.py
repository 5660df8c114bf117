"""Search space of `vgg` (the plain control of the lesion study): depth and the optimiser."""

from __future__ import annotations

from typing import Any

from search_spaces.common import optimizer
from trainables.methods.vgg import CONFIGS


def space(trial: Any) -> None:
    trial.suggest_categorical("model.depth", list(CONFIGS))
    optimizer(trial)
