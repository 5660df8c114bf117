"""Exit policies evaluated on cached per-exit softmax outputs, with no model call.

One pass over a split gives `ExitCache` (softmax of every exit for every sample); every policy is then a
vectorised function of the cache returning, per sample, the exit whose answer it takes and the exit up to which it
paid. Expected MACs are sum_k (fraction paying up to k) x cumulative MACs of exit k (heads of earlier exits
included, see cost.py); for a gated network the cache also holds each sample's own cumulative MACs (the branches
its gates skipped are free) and the expected MACs are their mean over the samples at their exits.

Policies (methods.md sections 5-7):
  static      every sample takes exit k (the network truncated there).
  confidence  exit at the first k whose max-softmax >= tau_k (one tau shared, or one per exit); the last exit
              answers for everyone left.
  budgeted    MSDNet's budgeted-batch rule (Huang et al., ICLR 2018, official `adaptive_inference.py`): for an exit
              prior pi_k proportional to q^k, per-exit confidence thresholds are derived on the *validation* split
              so that about floor(N pi_k) samples leave at exit k, then applied to any split as `confidence`.
  entropy     BranchyNet (Teerapittayanon et al., ICPR 2016): exit at the first k whose softmax entropy (nats) is
              below T_k; the last exit answers for everyone left.
  sdn         Shallow-Deep Networks (Kaya et al., ICML 2019): exit at the first exit (the last included) whose
              max-softmax >= q; a sample no exit is confident about gets the answer of its most confident exit
              and pays for the whole network, every head included.

A trial's frontier is a grid of static exits plus a grid of each chosen policy family, each row naming the policy
and the parameter that produced it, so `best` can hand back a config that reproduces the point.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Sequence

import numpy as np
import pandas as pd

from trainables.config import PolicyHparams

# Shared-threshold grid of the confidence frontier: dense near 1, where early exits start to cost accuracy.
CONFIDENCE_GRID = tuple(np.round(np.concatenate([np.linspace(0.3, 0.9, 13),
                                                 [0.92, 0.94, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999, 0.9999]]), 6))
# SDN's own q values start lower (0.1, 0.15, 0.25; official `sdn_test_early_exits` sweep), then the grid above.
SDN_GRID = (0.1, 0.15, 0.25) + CONFIDENCE_GRID
# MSDNet's 39 exit priors: q = p / 20 for p = 1..39 (0.05 ... 1.95).
BUDGETED_GRID = tuple(round(p / 20, 2) for p in range(1, 40))
# Entropy thresholds as fractions of the largest possible entropy, log(classes).
ENTROPY_FRACTIONS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# The official code's "nobody exits here" / "everybody exits here" thresholds, kept so the numbers compare.
NEVER, ALWAYS = 1e8, -1e8


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
    def num_classes(self) -> int:
        return self.probs.shape[2]

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=2)

    @property
    def entropy(self) -> np.ndarray:
        """Softmax entropy in nats, [exits, samples] (0 log 0 = 0)."""
        p = self.probs.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=2)

    @property
    def correct(self) -> np.ndarray:
        return self.probs.argmax(axis=2) == self.labels[None, :]


@dataclasses.dataclass(frozen=True)
class Decision:
    """Per sample: the exit whose prediction is used and the exit up to which the network ran (and paid)."""

    answer: np.ndarray
    pay: np.ndarray


def _per_exit(k: int, thresholds: Sequence[float] | float) -> np.ndarray:
    tau = np.asarray(thresholds, dtype=np.float64)
    tau = np.broadcast_to(tau, (k,)) if tau.ndim == 0 else tau
    if tau.shape != (k,):
        raise ValueError(f"{len(tau)} thresholds for {k} exits")
    return tau


def _first_passing(passes: np.ndarray) -> np.ndarray:
    passes = passes.copy()
    passes[-1] = True  # the last exit answers for everyone still in the network
    return passes.argmax(axis=0)


def confidence_exits(cache: ExitCache, thresholds: Sequence[float] | float) -> np.ndarray:
    """The exit each sample leaves at under the confidence policy."""
    return _first_passing(cache.confidence >= _per_exit(cache.num_exits, thresholds)[:, None])


def entropy_exits(cache: ExitCache, thresholds: Sequence[float] | float) -> np.ndarray:
    """The exit each sample leaves at under BranchyNet's rule: first exit with entropy strictly below T_k."""
    return _first_passing(cache.entropy < _per_exit(cache.num_exits, thresholds)[:, None])


def sdn_decision(cache: ExitCache, thresholds: Sequence[float] | float) -> Decision:
    """SDN's early exit: the first exit, the last one included, with max-softmax >= q; a sample with none answers
    with its most confident exit (the first of equals) and pays for every exit."""
    conf = cache.confidence
    passes = conf >= _per_exit(cache.num_exits, thresholds)[:, None]
    confident = passes.any(axis=0)
    first = passes.argmax(axis=0)
    answer = np.where(confident, first, conf.argmax(axis=0))
    pay = np.where(confident, first, cache.num_exits - 1)
    return Decision(answer, pay)


def static_exits(cache: ExitCache, exit: int) -> np.ndarray:
    n = len(cache.labels)
    return np.full(n, exit % cache.num_exits, dtype=np.int64)


def geometric_prior(num_exits: int, q: float) -> np.ndarray:
    """MSDNet's exit prior pi_k proportional to q^k, k = 1..K, normalised to sum to 1."""
    if not q > 0:
        raise ValueError(f"q={q} must be positive")
    logp = math.log(q) * np.arange(1, num_exits + 1, dtype=np.float64)
    p = np.exp(logp - logp.max())  # the same ratios without overflow for large K
    return p / p.sum()


def budgeted_thresholds(val: ExitCache, q: float) -> np.ndarray:
    """Per-exit confidence thresholds of MSDNet's budgeted-batch evaluation, derived on `val`.

    For k = 1..K-1 in turn: walk the samples not yet exited in descending order of exit k's confidence; the
    confidence of the m_k-th, m_k = floor(N pi_k), becomes T_k (if fewer than m_k are left, or m_k = 0, T_k stays
    1e8 and nobody exits at k); every sample with confidence >= T_k is then marked exited (ties at T_k all leave, so
    more than m_k can). T_K = -1e8. The m_k-th largest confidence is a value, so the order among equal
    confidences does not matter. m_k is computed in float64 with a 1e-9 guard, so N pi_k that is an integer in
    exact arithmetic (e.g. q = 1, N divisible by K) is not floored one too low by rounding."""
    k_total, n = val.num_exits, len(val.labels)
    prior = geometric_prior(k_total, q)
    conf = val.confidence.astype(np.float64)
    exited = np.zeros(n, dtype=bool)
    tau = np.full(k_total, NEVER)
    tau[-1] = ALWAYS
    for k in range(k_total - 1):
        m = math.floor(n * prior[k] + 1e-9)
        remaining = np.sort(conf[k][~exited])[::-1]
        if 1 <= m <= len(remaining):
            tau[k] = remaining[m - 1]
        exited |= conf[k] >= tau[k]
    return tau


def thresholds_of(policy: PolicyHparams, calib: ExitCache) -> np.ndarray | float:
    """The threshold(s) a non-static policy compares against: given (confidence, sdn: max-softmax; entropy: nats)
    or, for budgeted, derived on the calibration (validation) split."""
    if policy.name == "budgeted":
        return budgeted_thresholds(calib, policy.q)
    if policy.name == "entropy":
        return np.asarray(policy.entropies) if policy.entropies else policy.entropy
    return np.asarray(policy.thresholds) if policy.thresholds else policy.threshold


def apply(policy: PolicyHparams, cache: ExitCache, tau: np.ndarray | float) -> Decision:
    """Where every sample of `cache` exits under `policy` with its thresholds `tau` already fixed (ignored by
    static)."""
    if policy.name == "static":
        exits = static_exits(cache, policy.exit)
    elif policy.name in ("confidence", "budgeted"):
        exits = confidence_exits(cache, tau)
    elif policy.name == "entropy":
        exits = entropy_exits(cache, tau)
    elif policy.name == "sdn":
        return sdn_decision(cache, tau)
    else:
        raise ValueError(f"unknown policy {policy.name!r}")
    return Decision(exits, exits)


def decide(policy: PolicyHparams, cache: ExitCache, calib: ExitCache | None = None) -> Decision:
    """Where every sample of `cache` exits under `policy`; a `budgeted` policy derives its thresholds on `calib`
    (the validation split; `cache` itself when it is the validation split)."""
    tau = () if policy.name == "static" else thresholds_of(policy, calib if calib is not None else cache)
    return apply(policy, cache, tau)


def exits_for(policy: PolicyHparams, cache: ExitCache, calib: ExitCache | None = None) -> np.ndarray:
    """The exit whose answer each sample takes under `policy`."""
    return decide(policy, cache, calib).answer


@dataclasses.dataclass(frozen=True)
class Outcome:
    acc: float
    macs: float
    exit_fractions: tuple[float, ...]  # fraction of samples that ran up to (and paid for) each exit


def evaluate(cache: ExitCache, exits: np.ndarray | Decision, cum_macs: Sequence[int]) -> Outcome:
    """Accuracy and expected MACs per sample when sample n answers at (and pays up to) exits[n], or as a
    `Decision` says."""
    answer, pay = (exits.answer, exits.pay) if isinstance(exits, Decision) else (exits, exits)
    n = len(cache.labels)
    if n == 0:
        return Outcome(float("nan"), float("nan"), tuple(0.0 for _ in cum_macs))
    correct = cache.correct[answer, np.arange(n)]
    fractions = np.bincount(pay, minlength=cache.num_exits) / n
    macs = float(cache.macs[pay, np.arange(n)].mean()) if cache.macs is not None \
        else float(fractions @ np.asarray(cum_macs, dtype=np.float64))
    return Outcome(float(correct.mean()), macs, tuple(float(f) for f in fractions))


def operating_point(policy: PolicyHparams, cache: ExitCache, cum_macs: Sequence[int],
                    calib: ExitCache | None = None) -> Outcome:
    return evaluate(cache, decide(policy, cache, calib), cum_macs)


def family_grid(family: str, num_classes: int) -> list[tuple[float, PolicyHparams]]:
    """The (parameter, policy) points a frontier sweeps for one policy family."""
    if family == "confidence":
        return [(float(t), PolicyHparams(name="confidence", threshold=float(t))) for t in CONFIDENCE_GRID]
    if family == "sdn":
        return [(float(t), PolicyHparams(name="sdn", threshold=float(t))) for t in SDN_GRID]
    if family == "budgeted":
        return [(q, PolicyHparams(name="budgeted", q=q)) for q in BUDGETED_GRID]
    if family == "entropy":
        top = math.log(num_classes)
        return [(round(f * top, 6), PolicyHparams(name="entropy", entropy=round(f * top, 6)))
                for f in ENTROPY_FRACTIONS]
    if family == "static":
        return []
    raise ValueError(f"unknown policy family {family!r}")


def policy_param(policy: PolicyHparams) -> float:
    """The scalar a policy row is labelled with: threshold (confidence, sdn), entropy (nats), q (budgeted)."""
    return {"confidence": policy.threshold, "sdn": policy.threshold, "entropy": policy.entropy,
            "budgeted": policy.q}.get(policy.name, float("nan"))


def frontier(val: ExitCache, test: ExitCache | None, cum_macs: Sequence[int],
             families: Sequence[str] = ("confidence",), operating: PolicyHparams | None = None,
             overrides: dict | None = None) -> pd.DataFrame:
    """Every operating point of the policy grids: static exits, then each family's grid in turn, then (when
    `operating` is given) the trial's own searched operating point, flagged `operating`. Thresholds a policy
    derives (budgeted) are derived on `val` and applied unchanged to `test`.

    Columns: policy, param (the family's scalar: threshold, entropy in nats, or q; NaN for static), threshold
    (shared max-softmax threshold of confidence/sdn, else NaN), thresholds (JSON list of the per-exit thresholds
    used, "[]" if one was shared), exit (-1 unless static), operating, overrides (JSON: evaluation-only config keys
    under which the caches were made, "{}" for the trial's own), exit_fractions (JSON, on val), val_acc, macs
    (expected on the validation split: what search and queries compare), test_acc and test_macs (reported only)."""
    choices = [(f"static exit {k}", PolicyHparams(name="static", exit=k)) for k in range(val.num_exits)]
    if val.num_exits > 1:
        for family in dict.fromkeys(families):  # ordered, without repeats
            choices += [(f"{family} {p}", pol) for p, pol in family_grid(family, val.num_classes)]
    if operating is not None:
        choices.append(("operating", operating))
    rows = []
    for label, policy in choices:
        tau = () if policy.name == "static" else thresholds_of(policy, val)  # derived once, used on both splits
        v = evaluate(val, apply(policy, val, tau), cum_macs)
        t = evaluate(test, apply(policy, test, tau), cum_macs) if test is not None \
            else Outcome(float("nan"), float("nan"), ())
        per_exit = tau if np.ndim(tau) == 1 else ()
        shared = policy.name in ("confidence", "sdn") and not policy.thresholds
        rows.append({"policy": policy.name,
                     "param": policy_param(policy) if policy.name != "static" else float("nan"),
                     "threshold": policy.threshold if shared else float("nan"),
                     "thresholds": json.dumps([float(x) for x in per_exit]),
                     "exit": policy.exit if policy.name == "static" else -1,
                     "operating": label == "operating",
                     "overrides": json.dumps(overrides or {}, sort_keys=True),
                     "exit_fractions": json.dumps(list(v.exit_fractions)),
                     "val_acc": v.acc, "macs": v.macs, "test_acc": t.acc, "test_macs": t.macs})
    return pd.DataFrame(rows)


def frontier_families(policy: PolicyHparams) -> tuple[str, ...]:
    """The families a trial's frontier sweeps: `policy.grid` if set, else the operating policy's own family and
    MSDNet's budgeted-batch priors, so every multi-exit trial of a study has a budgeted-batch frontier to compare."""
    return tuple(policy.grid) if policy.grid else tuple(dict.fromkeys((policy.name, "budgeted")))
