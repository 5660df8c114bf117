"""Search space of `dsl`: `dhm`'s branch network without the mimicking terms, and the optimiser."""

from __future__ import annotations

from typing import Any

from search_spaces.common import optimizer
from search_spaces.dhm import branch_network


def space(trial: Any) -> dict[str, Any]:
    constants = branch_network(trial)
    optimizer(trial)
    return constants
