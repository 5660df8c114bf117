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

Optional, where a method needs them:
  POLICY_DEFAULTS               policy.* keys the method's configs start from (MSDNet: budgeted, SDN: sdn), before
                                the user's keys;
  model.set_progress(fraction)  called every training step with the fraction of training done (annealing);
  model.full_compute()          a context manager under which every dynamic part runs (cost measurement);
  model.lesion_units()          the units a lesion study may delete or reorder (trainables/lesion.py);
  model.notes                   [str]: facts about the built model a user should see (where its weights came
                                from), shown with the trial's result (tag dynastudy.notes) and by `describe`;
  eval_variants(hp) -> [dict]   evaluation-only config changes (flat keys) whose results join the trial's
                                frontier, applied without retraining by model.apply_eval(hp);
  fit(cfg, splits, ctx, state)  a training schedule of its own (lottery tickets: one report per pruning level),
                                run by `trainables.loop.fit` instead of its epoch loop;
  out.aux["gates"]              [N, L] 0/1 gate decisions, for per-sample MACs and gate-rate logs;
  out.aux["side_logits"]        [S, N, C] logits of train-only side heads (DHM's branches), whose accuracy is
                                logged per head; `model.side_heads` gives their ids (default 1..S);
  TABULAR = True                a method whose trials look results up (NAS-Bench-201) instead of training: no
                                dataset is loaded for it, and its `fit` receives splits=None;
  input_shape(hp) -> (dataset, classes, image side)
                                the data a method is tied to (nb201: its table's), for `describe`;
  OBJECTIVES {metric: help}     metrics a sweep may search instead of MACs as its second objective (minimised);
  paper_macs(model, image_size) -> [int]
                                cumulative MACs per exit under the paper's own counting rules (MSDNet's
                                op_counter.py: ReLU, pooling and linear biases counted too), which `describe`
                                prints next to the platform's count; frontiers keep the platform's unit.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from trainables.hparams import ConfigError

METHODS: dict[str, str] = {
    "resnet": "trainables.methods.resnet",
    "elastic": "trainables.methods.elastic",
    "aig": "trainables.methods.aig",
    "vgg": "trainables.methods.vgg",
    "dhm": "trainables.methods.dhm",
    "dsl": "trainables.methods.dsl",
    "lottery": "trainables.methods.lottery",
    "sdn": "trainables.methods.sdn",
    "msdnet": "trainables.methods.msdnet",
    "nb201": "trainables.methods.nb201",
}

# The metrics each method offers as OBJECTIVES (its module is the source; tests check the two agree), here so that
# the command line can list them without importing torch and every method.
METHOD_OBJECTIVES: dict[str, tuple[str, ...]] = {
    "nb201": ("latency_s", "params_m"),
}


def get_method(name: str) -> ModuleType:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name])
