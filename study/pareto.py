"""Pareto fronts and hypervolume of accuracy (maximised) vs MACs (minimised). Pure functions on arrays."""

from __future__ import annotations

import numpy as np


def non_dominated(acc: np.ndarray, macs: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (>= accuracy and <= MACs, one strictly).

    Of several identical points only the first is kept. O(n log n): sort by MACs ascending (accuracy
    descending on ties) and keep each point that beats the best accuracy seen so far."""
    acc, macs = np.asarray(acc, dtype=float), np.asarray(macs, dtype=float)
    keep = np.zeros(len(acc), dtype=bool)
    ok = np.isfinite(acc) & np.isfinite(macs)
    order = [i for i in np.lexsort((-acc, macs)) if ok[i]]
    best = -np.inf
    for i in order:
        if acc[i] > best:
            keep[i] = True
            best = acc[i]
    return keep


def hypervolume(acc: np.ndarray, macs: np.ndarray, ref_acc: float, ref_macs: float) -> float:
    """Area dominated by the points and bounded by the reference point (ref_acc, ref_macs), in
    accuracy x MACs units; points at or beyond the reference contribute nothing."""
    acc, macs = np.asarray(acc, dtype=float), np.asarray(macs, dtype=float)
    inside = (acc > ref_acc) & (macs < ref_macs) & np.isfinite(acc) & np.isfinite(macs)
    acc, macs = acc[inside], macs[inside]
    front = non_dominated(acc, macs)
    acc, macs = acc[front], macs[front]
    order = np.argsort(macs)
    acc, macs = acc[order], macs[order]
    # Sweep from cheap to expensive: each front point adds a slab up to the next point's MACs.
    edges = np.append(macs[1:], ref_macs)
    return float(np.sum((edges - macs) * (acc - ref_acc)) + 0.0) if len(acc) else 0.0
