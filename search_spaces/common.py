"""Sub-spaces shared by every method: the optimiser and the exit policy's operating point."""

from __future__ import annotations

from typing import Any


def optimizer(trial: Any) -> None:
    trial.suggest_float("optim.lr", 0.01, 0.4, log=True)
    trial.suggest_float("optim.weight_decay", 1e-5, 2e-3, log=True)
    trial.suggest_float("optim.label_smoothing", 0.0, 0.2)


def policy(trial: Any, default: str = "confidence") -> str:
    """The operating point of a multi-exit network's exit policy (evaluation only, methods.md section 8): the
    policy is the method's default unless the user fixes `policy.name`; its own parameter is searched."""
    name = trial.suggest_categorical("policy.name", [default])
    if name in ("confidence", "sdn"):
        trial.suggest_float("policy.threshold", 0.5, 0.999)
    elif name == "budgeted":
        trial.suggest_float("policy.q", 0.05, 1.95)
    elif name == "entropy":
        trial.suggest_float("policy.entropy", 0.005, 1.5, log=True)
    return name
