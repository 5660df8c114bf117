"""Exit policies on hand-made caches, with exact expected values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainables import policies
from trainables.config import PolicyHparams

# 3 exits, 4 samples, 2 classes; labels all 0.
PROBS = np.array([
    [[0.95, 0.05], [0.60, 0.40], [0.30, 0.70], [0.55, 0.45]],  # exit 0: conf .95 .6 .7 .55; correct T T F T
    [[0.90, 0.10], [0.85, 0.15], [0.20, 0.80], [0.40, 0.60]],  # exit 1: conf .9 .85 .8 .6;  correct T T F F
    [[0.99, 0.01], [0.70, 0.30], [0.60, 0.40], [0.45, 0.55]],  # exit 2: conf .99 .7 .6 .55; correct T T T F
], dtype=np.float32)
CACHE = policies.ExitCache(PROBS, np.zeros(4, dtype=np.int64))
MACS = [10, 25, 60]


def test_confidence_shared_threshold():
    exits = policies.confidence_exits(CACHE, 0.8)
    assert exits.tolist() == [0, 1, 1, 2]
    out = policies.evaluate(CACHE, exits, MACS)
    assert out.acc == pytest.approx(2 / 4)  # T, T, F (exit 1 on sample 2), F (exit 2 on sample 3)
    assert out.macs == pytest.approx((10 + 25 + 25 + 60) / 4)
    assert out.exit_fractions == (0.25, 0.5, 0.25)


def test_confidence_per_exit_thresholds_and_last_exit_takes_the_rest():
    exits = policies.confidence_exits(CACHE, [0.99, 0.99, 0.99])
    assert exits.tolist() == [2, 2, 2, 2]
    assert policies.confidence_exits(CACHE, [0.5, 1.0, 1.0]).tolist() == [0, 0, 0, 0]
    assert policies.evaluate(CACHE, np.array([2, 2, 2, 2]), MACS).acc == pytest.approx(0.75)


def test_static_policy_and_policy_hparams():
    assert policies.exits_for(PolicyHparams(name="static", exit=1), CACHE).tolist() == [1, 1, 1, 1]
    assert policies.exits_for(PolicyHparams(name="static", exit=-1), CACHE).tolist() == [2, 2, 2, 2]
    assert policies.exits_for(PolicyHparams(threshold=0.8), CACHE).tolist() == [0, 1, 1, 2]


def test_frontier_rows_name_their_policy():
    df = policies.frontier(CACHE, CACHE, MACS, grid=[0.5, 0.8])
    assert df["policy"].tolist() == ["static"] * 3 + ["confidence"] * 2
    static1 = df.iloc[1]
    assert static1["exit"] == 1 and static1["val_acc"] == pytest.approx(0.5) and static1["macs"] == 25
    conf = df[df["threshold"] == 0.8].iloc[0]
    assert conf["val_acc"] == pytest.approx(0.5) and conf["macs"] == pytest.approx(30.0)
    assert (df["test_acc"] == df["val_acc"]).all()


def test_frontier_carries_the_searched_operating_point():
    from study.queries import point_config

    op = PolicyHparams(thresholds=(0.9, 0.8, 0.5))
    df = policies.frontier(CACHE, None, MACS, grid=[0.5], operating=op)
    row = df.iloc[-1]
    assert row["operating"] and not df["operating"].iloc[:-1].any()
    assert json.loads(row["thresholds"]) == [0.9, 0.8, 0.5]
    assert policies.confidence_exits(CACHE, [0.9, 0.8, 0.5]).tolist() == [0, 1, 1, 2]
    assert row["val_acc"] == pytest.approx(0.5) and row["macs"] == pytest.approx(30.0)
    cfg = point_config(row.copy().rename(None).to_frame().T.assign(params=[{"method": "elastic"}]).iloc[0])
    assert cfg["policy.name"] == "confidence" and cfg["policy.thresholds"] == [0.9, 0.8, 0.5]


def test_single_exit_frontier_is_one_point():
    one = policies.ExitCache(PROBS[2:], np.zeros(4, dtype=np.int64))
    df = policies.frontier(one, None, [60])
    assert len(df) == 1 and df.iloc[0]["val_acc"] == pytest.approx(0.75)
