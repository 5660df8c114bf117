"""Sub-spaces shared by every method: the optimiser."""

from __future__ import annotations

from typing import Any


def optimizer(trial: Any) -> None:
    trial.suggest_float("optim.lr", 0.01, 0.4, log=True)
    trial.suggest_float("optim.weight_decay", 1e-5, 2e-3, log=True)
    trial.suggest_float("optim.label_smoothing", 0.0, 0.2)
