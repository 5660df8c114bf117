"""The method registry: an explicit name -> module table (no import-time registration, so Ray workers that
import lazily see the same table).

A method module defines:
  NAME, PAPER                   its registry name and the paper it implements;
  Hparams                       a frozen `trainables.hparams.Hparams` dataclass (the `model.*` keys);
  num_exits(hp) -> int          how many exits the network has;
  build(hp, num_classes)        an nn.Module whose forward returns `MultiExitOutput` and whose `segments()`
                                lists its parts in execution order for cost accounting;
  loss(out, y, hp, label_smoothing) -> Tensor
                                the training loss over all exits.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from trainables.hparams import ConfigError

METHODS: dict[str, str] = {
    "resnet": "trainables.methods.resnet",
    "elastic": "trainables.methods.elastic",
}


def get_method(name: str) -> ModuleType:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name])
