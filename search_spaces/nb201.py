"""Search space of `nb201`: the operation of each of the NAS-Bench-201 cell's six edges (5^6 = 15,625 cells; the
benchmark's own space). The table (`model.table`) and the simulated duration are settings, not searched."""

from __future__ import annotations

from typing import Any

from trainables.methods.nb201 import EDGES, OPS


def space(trial: Any) -> None:
    for i in range(len(EDGES)):
        trial.suggest_categorical(f"model.ops.{i}", list(OPS))
