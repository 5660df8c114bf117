"""Pareto front, hypervolume and best-point queries on hand-made points."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from study import queries
from study.pareto import hypervolume, non_dominated
from trainables.hparams import ConfigError

ACC = np.array([0.5, 0.6, 0.55, 0.7, 0.7, 0.65])
MACS = np.array([10, 20, 25, 40, 50, 40])


def test_non_dominated():
    assert non_dominated(ACC, MACS).tolist() == [True, True, False, True, False, False]
    assert non_dominated(np.array([0.5, np.nan]), np.array([1, 0])).tolist() == [True, False]


def test_hypervolume_by_hand():
    # Front (10, .5), (20, .6), (40, .7) against (acc 0, macs 100):
    # 10 x .5 + 20 x .6 + 60 x .7 = 5 + 12 + 42 = 59
    assert hypervolume(ACC, MACS, 0.0, 100.0) == pytest.approx(59.0)
    assert hypervolume(ACC, MACS, 0.6, 30.0) == pytest.approx(0.0)
    assert hypervolume(ACC, MACS, 0.4, 30.0) == pytest.approx(10 * 0.1 + 10 * 0.2)


def _points():
    return pd.DataFrame({"run_id": list("abcdef"), "method": "elastic", "trial": list("abcdef"),
                         "policy": ["static", "confidence"] * 3, "threshold": [np.nan, 0.9] * 3,
                         "exit": [2, -1] * 3, "val_acc": ACC, "test_acc": ACC - 0.01, "macs": MACS,
                         "test_macs": MACS, "params": [{"method": "elastic", "policy.threshold": 0.5}] * 6})


def test_pareto_and_best():
    res = queries.pareto(_points(), ref_macs=100)
    assert res.front["run_id"].tolist() == ["a", "b", "d"] and res.hypervolume == pytest.approx(59.0)
    assert queries.best_point(_points(), max_macs=30)["run_id"] == "b"
    assert queries.best_point(_points(), min_acc=0.65)["run_id"] == "d"  # cheapest reaching 0.65 (ties on acc)
    with pytest.raises(ConfigError, match="no point needs at most"):
        queries.best_point(_points(), max_macs=5)
    with pytest.raises(ConfigError, match="no point reaches val_acc 0.9"):
        queries.best_point(_points(), min_acc=0.9)


def test_point_config_carries_the_thresholds():
    p = _points()
    conf = queries.point_config(p.iloc[1])
    assert conf["policy.name"] == "confidence" and conf["policy.threshold"] == 0.9
    static = queries.point_config(p.iloc[0])
    assert static["policy.name"] == "static" and static["policy.exit"] == 2


def test_point_config_applies_evaluation_only_overrides():
    p = _points()
    point = p.iloc[0].copy()
    point["overrides"] = '{"model.cutoff": 0.7}'
    assert queries.point_config(point)["model.cutoff"] == 0.7
    assert "model.cutoff" not in queries.point_config(p.iloc[0])  # frontiers without the column: no overrides
