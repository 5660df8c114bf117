"""Exit policies evaluated on cached per-exit softmax outputs, with no model call.

One pass over a split gives `ExitCache` (softmax of every exit for every sample); every policy is then a
vectorised function of the cache returning, per sample, the exit it leaves at. Expected MACs are
sum_k (fraction exiting at k) x cumulative MACs of exit k (heads of earlier exits included, see cost.py); for a
gated network the cache also holds each sample's own cumulative MACs (the branches its gates skipped are free)
and the expected MACs are their mean over the samples at their exits.

Policies:
  confidence  exit at the first k whose max-softmax >= tau_k (one tau shared, or one per exit); the last exit
              takes everyone left (BranchyNet/MSDNet-style early exit).
  static      every sample takes exit k (truncating the network there).

A trial's frontier is a grid of both, each row naming the policy and parameter that produced it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np
import pandas as pd

from trainables.config import PolicyHparams

# Shared-threshold grid of the confidence frontier: dense near 1, where early exits start to cost accuracy.
CONFIDENCE_GRID = tuple(np.round(np.concatenate([np.linspace(0.3, 0.9, 13),
                                                 [0.92, 0.94, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999, 0.9999]]), 6))


@dataclasses.dataclass(frozen=True)
class ExitCache:
    """Softmax outputs of every exit on one split: probs[k, n, c], with the labels, and for a gated network
    macs[k, n], the cumulative MACs sample n pays to reach exit k (None: the static per-exit costs)."""

    probs: np.ndarray
    labels: np.ndarray
    macs: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.probs.ndim != 3 or self.probs.shape[1] != len(self.labels):
            raise ValueError(f"probs must be [exits, samples, classes] matching {len(self.labels)} labels, "
                             f"got {self.probs.shape}")
        if self.macs is not None and self.macs.shape != self.probs.shape[:2]:
            raise ValueError(f"macs must be [exits, samples] = {self.probs.shape[:2]}, got {self.macs.shape}")

    @property
    def num_exits(self) -> int:
        return self.probs.shape[0]

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=2)

    @property
    def correct(self) -> np.ndarray:
        return self.probs.argmax(axis=2) == self.labels[None, :]


def confidence_exits(cache: ExitCache, thresholds: Sequence[float] | float) -> np.ndarray:
    """The exit each sample leaves at under the confidence policy."""
    k = cache.num_exits
    tau = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (k,)) if np.ndim(thresholds) == 0 \
        else np.asarray(thresholds, dtype=np.float64)
    if tau.shape != (k,):
        raise ValueError(f"{len(tau)} thresholds for {k} exits")
    passes = cache.confidence >= tau[:, None]
    passes[-1] = True  # the last exit answers for everyone still in the network
    return passes.argmax(axis=0)


def static_exits(cache: ExitCache, exit: int) -> np.ndarray:
    n = len(cache.labels)
    return np.full(n, exit % cache.num_exits, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Outcome:
    acc: float
    macs: float
    exit_fractions: tuple[float, ...]


def evaluate(cache: ExitCache, exits: np.ndarray, cum_macs: Sequence[int]) -> Outcome:
    """Accuracy and expected MACs per sample when sample n leaves at exits[n]."""
    n = len(cache.labels)
    if n == 0:
        return Outcome(float("nan"), float("nan"), tuple(0.0 for _ in cum_macs))
    correct = cache.correct[exits, np.arange(n)]
    fractions = np.bincount(exits, minlength=cache.num_exits) / n
    macs = float(cache.macs[exits, np.arange(n)].mean()) if cache.macs is not None \
        else float(fractions @ np.asarray(cum_macs, dtype=np.float64))
    return Outcome(float(correct.mean()), macs, tuple(float(f) for f in fractions))


def exits_for(policy, cache: ExitCache) -> np.ndarray:
    """The exits chosen by a `PolicyHparams` (name, threshold(s), exit)."""
    if policy.name == "static":
        return static_exits(cache, policy.exit)
    if policy.name == "confidence":
        return confidence_exits(cache, policy.thresholds if policy.thresholds else policy.threshold)
    raise ValueError(f"unknown policy {policy.name!r}")


def frontier(val: ExitCache, test: ExitCache | None, cum_macs: Sequence[int],
             grid: Sequence[float] = CONFIDENCE_GRID, operating: PolicyHparams | None = None,
             overrides: dict | None = None) -> pd.DataFrame:
    """Every operating point of the policy grid: static exits, then shared confidence thresholds, then (when
    `operating` is given) the trial's own searched operating point, flagged `operating`.

    Columns: policy, threshold (NaN for static), thresholds (JSON list of per-exit thresholds, "[]" if shared),
    exit (-1 for confidence), operating, overrides (JSON: evaluation-only config keys under which the caches
    were made, "{}" for the trial's own), val_acc, macs (expected on the validation split: what search and
    queries compare), test_acc and test_macs (reported only)."""
    choices = [(f"static exit {k}", PolicyHparams(name="static", exit=k)) for k in range(val.num_exits)]
    if val.num_exits > 1:
        choices += [(f"confidence {t}", PolicyHparams(name="confidence", threshold=float(t))) for t in grid]
    if operating is not None:
        choices.append(("operating", operating))
    rows = []
    for label, policy in choices:
        v = evaluate(val, exits_for(policy, val), cum_macs)
        t = evaluate(test, exits_for(policy, test), cum_macs) if test is not None \
            else Outcome(float("nan"), float("nan"), ())
        rows.append({"policy": policy.name,
                     "threshold": policy.threshold if policy.name == "confidence" and not policy.thresholds
                     else float("nan"),
                     "thresholds": json.dumps(list(policy.thresholds)),
                     "exit": policy.exit if policy.name == "static" else -1,
                     "operating": label == "operating",
                     "overrides": json.dumps(overrides or {}, sort_keys=True),
                     "val_acc": v.acc, "macs": v.macs, "test_acc": t.acc, "test_macs": t.macs})
    return pd.DataFrame(rows)
