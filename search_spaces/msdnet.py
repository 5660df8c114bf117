"""Search space of `msdnet` (methods.md section 8): the block layout (blocks 3-10, step mode, step, base), the
growth rate (6-16), the first layer's channels (16-32), the exit-loss weights (uniform or linear), the operating
point of the exit policy (budgeted: the prior's q), and the optimiser. The paper's two CIFAR networks lie inside
this space.

The architecture is searched under `model.preset=custom`. The preset is a one-choice parameter rather than a
constant so that a user who fixes a paper preset (`--set model.preset=anytime`) gets it back here and the
architecture keys, which that preset fixes, are left alone: only the loss weights and the optimiser are searched.
lin_grow keeps step 1 (the paper's): with step 2 a 10-block network would have about 100 layers. Even so the
space spans about 13M to 2.5G MACs per image (3 one-layer blocks at growth 6 and 16 channels, against 10 lin_grow
blocks, 58 layers, at growth 16 and 32 channels; the presets are 58M and 75M).
"""

from __future__ import annotations

from typing import Any

from search_spaces.common import optimizer, policy


def space(trial: Any) -> dict[str, Any] | None:
    constants = None
    if trial.suggest_categorical("model.preset", ["custom"]) == "custom":
        trial.suggest_int("model.blocks", 3, 10)
        if trial.suggest_categorical("model.step_mode", ["even", "lin_grow"]) == "even":
            trial.suggest_int("model.step", 1, 2)
        else:
            constants = {"model.step": 1}
        trial.suggest_int("model.base", 1, 4)
        trial.suggest_int("model.growth_rate", 6, 16)
        trial.suggest_int("model.channels", 16, 32, step=4)
    trial.suggest_categorical("model.weights", ["uniform", "linear"])
    policy(trial, "budgeted")
    optimizer(trial)
    return constants
