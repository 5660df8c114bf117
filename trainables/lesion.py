"""The lesion study of "Residual Networks Behave Like Ensembles of Relatively Shallow Networks" (Veit, Wilber,
Belongie, NeurIPS 2016): delete units of a trained network at test time, or reorder them, and measure the error.

A model offers its units through `lesion_units()` (trainables/models/cifar_resnet.py: `LesionUnits`): deleting a
residual block keeps its shortcut (the identity, or the projection of a downsampling block) and drops its
residual branch, with BatchNorm statistics untouched; deleting a plain VGG unit makes it the identity.
Reordering swaps units of one swap group (same input and output shape). Every variant is undone afterwards, so
the model leaves the study as it came.

Rows of the result (one evaluation each):
  kind     none (the intact model) | single (one unit deleted) | random (k random units) | reorder (s swaps)
  k        units deleted, or swaps made
  repeat   the draw, for random and reorder
  units    JSON list: the deleted positions, or the new order (reorder)
  kendall_tau  rank correlation of the new order with the original (reorder; 1 otherwise)
  error    test error of the final exit
"""

from __future__ import annotations

import contextlib
import json
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from torch import nn

COLUMNS = ["kind", "k", "repeat", "units", "kendall_tau", "error"]


@contextlib.contextmanager
def deleted(model: nn.Module, positions: Sequence[int]) -> Iterator[None]:
    units = model.lesion_units()
    bad = [p for p in positions if p not in units.deletable]
    if bad:
        raise ValueError(f"units {bad} cannot be deleted; deletable: {list(units.deletable)}")
    for p in positions:
        units.container[p].lesioned = True
    try:
        yield
    finally:
        for p in positions:
            units.container[p].lesioned = False


@contextlib.contextmanager
def reordered(model: nn.Module, order: Sequence[int]) -> Iterator[None]:
    """Run the container's units in `order` (a permutation of its positions)."""
    container = model.lesion_units().container
    original = list(container)
    if sorted(order) != list(range(len(original))):
        raise ValueError(f"{list(order)} is not a permutation of 0..{len(original) - 1}")
    for i, j in enumerate(order):
        container[i] = original[j]
    try:
        yield
    finally:
        for i, m in enumerate(original):
            container[i] = m


def kendall_tau(order: Sequence[int]) -> float:
    """Kendall's tau between `order` and the identity order (no ties)."""
    a = np.asarray(order)
    n = len(a)
    if n < 2:
        return 1.0
    i, j = np.triu_indices(n, 1)
    concordant = np.sign(a[j] - a[i]).sum()
    return float(concordant / (n * (n - 1) / 2))


def random_swaps(groups: Sequence[Sequence[int]], n: int, swaps: int, rng: np.random.Generator) -> list[int]:
    """An order of n positions after `swaps` swaps of two random units of one random swap group."""
    order = list(range(n))
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        raise ValueError("this network has no two units that can trade places")
    for _ in range(swaps):
        g = groups[rng.integers(len(groups))]
        a, b = rng.choice(len(g), size=2, replace=False)
        pa, pb = g[a], g[b]
        order[pa], order[pb] = order[pb], order[pa]
    return order


def study(model: nn.Module, error: Callable[[nn.Module], float], blocks: Sequence[int] | None = None,
          random_k: int = 0, repeats: int = 10, reorder_swaps: int = 0, seed: int = 0,
          progress: Callable[[str], None] = lambda _: None) -> pd.DataFrame:
    """Evaluate `error(model)` intact, with each of `blocks` (default: every deletable unit) deleted, with k random
    units deleted (k = 1..random_k, `repeats` draws each) and after s random swaps (s = 1..reorder_swaps)."""
    units = model.lesion_units()
    blocks = list(units.deletable) if blocks is None else list(blocks)
    rng = np.random.default_rng(seed)
    rows = [{"kind": "none", "k": 0, "repeat": 0, "units": "[]", "kendall_tau": 1.0, "error": error(model)}]
    progress(f"intact: error {rows[0]['error']:.4f}")
    for p in blocks:
        with deleted(model, [p]):
            rows.append({"kind": "single", "k": 1, "repeat": 0, "units": json.dumps([p]), "kendall_tau": 1.0,
                         "error": error(model)})
        progress(f"unit {p} deleted: error {rows[-1]['error']:.4f}")
    for k in range(1, min(random_k, len(units.deletable)) + 1):
        for r in range(repeats):
            chosen = sorted(int(x) for x in rng.choice(units.deletable, size=k, replace=False))
            with deleted(model, chosen):
                rows.append({"kind": "random", "k": k, "repeat": r, "units": json.dumps(chosen), "kendall_tau": 1.0,
                             "error": error(model)})
        progress(f"{k} random units deleted: mean error "
                 f"{np.mean([x['error'] for x in rows if x['kind'] == 'random' and x['k'] == k]):.4f}")
    for s in range(1, reorder_swaps + 1):
        for r in range(repeats):
            order = random_swaps(units.swap_groups, len(units.container), s, rng)
            with reordered(model, order):
                rows.append({"kind": "reorder", "k": s, "repeat": r, "units": json.dumps(order),
                             "kendall_tau": kendall_tau(order), "error": error(model)})
        progress(f"{s} swaps: mean error "
                 f"{np.mean([x['error'] for x in rows if x['kind'] == 'reorder' and x['k'] == s]):.4f}")
    return pd.DataFrame(rows, columns=COLUMNS)


def summary(df: pd.DataFrame) -> dict:
    """The study in a few lists: error per deleted unit, error vs k, error vs swaps (with Kendall tau)."""
    def by_k(kind: str) -> list[dict]:
        g = df[df.kind == kind].groupby("k")
        return [{"k": int(k), "mean_error": float(x.error.mean()), "std_error": float(x.error.std(ddof=0)),
                 "min_error": float(x.error.min()), "max_error": float(x.error.max()),
                 "mean_kendall_tau": float(x.kendall_tau.mean()), "n": int(len(x))} for k, x in g]

    single = df[df.kind == "single"]
    return {"baseline_error": float(df[df.kind == "none"].error.iloc[0]),
            "single": [{"unit": json.loads(u)[0], "error": float(e)} for u, e in zip(single.units, single.error)],
            "random": by_k("random"), "reorder": by_k("reorder")}


def plot(df: pd.DataFrame, title: str) -> bytes:
    """PNG: error per deleted unit, error vs number of deleted units, error vs Kendall tau of reorderings."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(df)
    panels = [p for p in ("single", "random", "reorder") if s[p]]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.axhline(s["baseline_error"], color="gray", ls="--", lw=1, label="intact")
        if panel == "single":
            ax.bar([r["unit"] for r in s["single"]], [r["error"] for r in s["single"]], color="tab:blue")
            ax.set_xlabel("deleted unit")
        elif panel == "random":
            ks = [r["k"] for r in s["random"]]
            ax.errorbar(ks, [r["mean_error"] for r in s["random"]], yerr=[r["std_error"] for r in s["random"]],
                        marker="o", capsize=3)
            ax.set_xlabel("units deleted at random (k)")
        else:
            rows = df[df.kind == "reorder"]
            ax.scatter(rows.kendall_tau, rows.error, s=12)
            ax.set_xlabel("Kendall tau of the reordering")
        ax.set_ylabel("test error")
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
