"""Search space of `elastic` (methods.md section 8): depth, loss-weight scheme (uniform, linear in depth, or an
independent weight per intermediate exit on a log scale, the final exit's weight fixed at 1), head dropout,
the exit policy's operating point (the confidence threshold unless policy.name is fixed), and the optimiser.

The backbone is never searched: it is the user's choice (`--set model.backbone=resnet18`), cifar_resnet when
none is fixed. It is asked for as a one-choice categorical, so a fixed value comes back through the sweep's
trial proxy (study/search.py) and an unfixed one is cifar_resnet without a draw: Optuna samples nothing for a
single-value distribution, so the draws of cifar_resnet sweeps are those of the space before backbones
existed. The rest follows the backbone: `model.depth` exists only for cifar_resnet, and an independent scheme
gets one weight per exit of the chosen backbone. `model.width` and `model.pretrained` are never searched.
"""

from __future__ import annotations

from typing import Any

from search_spaces.common import optimizer, policy
from trainables.models.cifar_resnet import DEPTHS, blocks_per_stage
from trainables.models.torchvision_backbones import NUM_BLOCKS


def space(trial: Any) -> dict[str, Any] | None:
    backbone = trial.suggest_categorical("model.backbone", ["cifar_resnet"])
    if backbone == "cifar_resnet":
        exits = 3 * blocks_per_stage(trial.suggest_categorical("model.depth", list(DEPTHS)))
    else:
        exits = NUM_BLOCKS[backbone]
    scheme = trial.suggest_categorical("model.weights", ["uniform", "linear", "independent"])
    trial.suggest_float("model.head_dropout", 0.0, 0.5)
    policy(trial)
    optimizer(trial)
    if scheme == "independent":
        for k in range(exits - 1):
            trial.suggest_float(f"model.exit_weights.{k}", 0.1, 1.0, log=True)
        return {f"model.exit_weights.{exits - 1}": 1.0}
    return None
