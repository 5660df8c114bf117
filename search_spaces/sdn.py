"""Search space of `sdn` (methods.md section 8): the backbone (ResNet depth; VGG-16, the paper's VGG), the IC
positions as a named layout, the scale of the maximum IC loss weights C_i (0.5-2x), the operating point of the
exit policy (SDN's own: threshold q), and the optimiser. Every layout is valid on every backbone offered here
(tests/test_sdn.py)."""

from __future__ import annotations

from typing import Any

from search_spaces.common import optimizer, policy
from trainables.methods.sdn import BACKBONES, LAYOUTS
from trainables.models.cifar_resnet import DEPTHS

VGG_DEPTH = 16  # VGG-11 is too shallow for the paper's six ICs: two of them land on one unit


def space(trial: Any) -> dict[str, Any]:
    constants = {}
    if trial.suggest_categorical("model.backbone", list(BACKBONES)) == "resnet":
        trial.suggest_categorical("model.depth", list(DEPTHS))
    else:
        constants["model.depth"] = VGG_DEPTH
    trial.suggest_categorical("model.ic_layout", list(LAYOUTS))
    trial.suggest_float("model.ic_weight_scale", 0.5, 2.0, log=True)
    policy(trial, "sdn")
    optimizer(trial)
    return constants
