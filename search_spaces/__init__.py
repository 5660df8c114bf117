"""Search spaces: one define-by-run function per method, found through an explicit name -> module table.

`space(trial)` only calls `trial.suggest_*` (Ray's OptunaSearch runs it on the driver for every trial, so it
must not compute anything heavy) and may return a dict of constant flat keys derived from the suggestions.
Parameter names are the flat config keys (`optim.lr`, `model.depth`); an element of a list-valued key is
suggested as `key.<i>`. A key the user fixes (`--set`, `--config`) is never suggested: see `study/search.py`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from trainables.hparams import ConfigError

SPACES: dict[str, str] = {
    "resnet": "search_spaces.resnet",
    "elastic": "search_spaces.elastic",
    "aig": "search_spaces.aig",
    "vgg": "search_spaces.vgg",
    "dhm": "search_spaces.dhm",
    "dsl": "search_spaces.dsl",
    "lottery": "search_spaces.lottery",
    "sdn": "search_spaces.sdn",
    "msdnet": "search_spaces.msdnet",
    "nb201": "search_spaces.nb201",
}

SpaceFn = Callable[[Any], "dict[str, Any] | None"]


def get_space(method: str) -> SpaceFn:
    if method not in SPACES:
        raise ConfigError(f"no search space for method {method!r}; methods with one: {', '.join(SPACES)}")
    return importlib.import_module(SPACES[method]).space
