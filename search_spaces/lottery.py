"""Search space of `lottery` (methods.md section 8): prune fraction f, rewind step k, number of levels, global vs
layer-wise ranking, learning-rate warm-up (in steps) and the learning rate. The backbone, its depth, `exclude`
and the controls are settings (`--set model.backbone=vgg --set model.depth=16`), since a sweep compares tickets of
one network. A rewind step past the end of a (short) trial's training fails that trial with its reason: fix
`model.rewind_step` for tiny budgets."""

from __future__ import annotations

from typing import Any


def space(trial: Any) -> None:
    trial.suggest_float("model.prune_fraction", 0.1, 0.5)
    trial.suggest_categorical("model.rewind_step", [0, 100, 500, 1000, 2000])
    trial.suggest_int("model.levels", 1, 8)
    trial.suggest_categorical("model.scope", ["global", "layerwise"])
    trial.suggest_categorical("optim.warmup_steps", [0, 500, 2000, 10000])
    trial.suggest_float("optim.lr", 0.01, 0.2, log=True)
    trial.suggest_float("optim.weight_decay", 1e-5, 1e-3, log=True)
