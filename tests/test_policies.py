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
    df = policies.frontier(CACHE, CACHE, MACS)
    assert df["policy"].tolist() == ["static"] * 3 + ["confidence"] * len(policies.CONFIDENCE_GRID)
    static1 = df.iloc[1]
    assert static1["exit"] == 1 and static1["val_acc"] == pytest.approx(0.5) and static1["macs"] == 25
    conf = df[df["threshold"] == 0.8].iloc[0]
    assert conf["param"] == 0.8 and json.loads(conf["exit_fractions"]) == [0.25, 0.5, 0.25]
    assert conf["val_acc"] == pytest.approx(0.5) and conf["macs"] == pytest.approx(30.0)
    assert (df["test_acc"] == df["val_acc"]).all()


def test_frontier_carries_the_searched_operating_point():
    from study.queries import point_config

    op = PolicyHparams(thresholds=(0.9, 0.8, 0.5))
    df = policies.frontier(CACHE, None, MACS, operating=op)
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


def test_entropy_policy_exits_where_entropy_is_strictly_below_the_threshold():
    # entropies (nats): exit 0 .199 .673 .611 .688; exit 1 .325 .423 .5004 .673; exit 2 .056 .611 .673 .688
    assert policies.entropy_exits(CACHE, 0.5).tolist() == [0, 1, 2, 2]  # H(.8, .2) = 0.5004 is not below 0.5
    out = policies.evaluate(CACHE, policies.entropy_exits(CACHE, 0.5), MACS)
    assert out.acc == pytest.approx(0.75) and out.macs == pytest.approx((10 + 25 + 60 + 60) / 4)
    assert policies.exits_for(PolicyHparams(name="entropy", entropies=(0.1, 0.1, 0.1)), CACHE).tolist() == [2] * 4


def test_sdn_policy_answers_with_the_most_confident_exit_and_charges_full_cost():
    d = policies.decide(PolicyHparams(name="sdn", threshold=0.9), CACHE)
    assert d.answer.tolist() == [0, 1, 1, 1] and d.pay.tolist() == [0, 2, 2, 2]
    out = policies.evaluate(CACHE, d, MACS)
    assert out.acc == pytest.approx(0.5)  # T, T (exit 1 of sample 1), F, F
    assert out.exit_fractions == (0.25, 0.0, 0.75)
    assert out.macs == pytest.approx((10 + 60 * 3) / 4)
    assert out.macs == pytest.approx(np.dot(out.exit_fractions, MACS))  # the expected cost is sum fraction x cost


# Budgeted batch: 3 exits, 10 validation samples, 2 classes, every label 0 (class 0 has the max-softmax).
CONF_VAL = np.array([[0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.6, 0.55, 0.7, 0.65],
                     [0.99, 0.99, 0.5, 0.5, 0.5, 0.5, 0.9, 0.75, 0.9, 0.6],
                     [0.7] * 10])


def _two_class(conf: np.ndarray, labels: np.ndarray | None = None) -> policies.ExitCache:
    probs = np.stack([conf, 1 - conf], axis=2)
    return policies.ExitCache(probs, np.zeros(conf.shape[1], dtype=np.int64) if labels is None else labels)


def test_budgeted_thresholds_by_hand_with_ties():
    val = _two_class(CONF_VAL)
    # q = 0.5: pi = (4, 2, 1) / 7 -> m = floor(5.71) = 5, floor(2.86) = 2. The 5th confidence at exit 0 is 0.8, a
    # tie of five: all six samples >= 0.8 leave (more than 5). Left: 6, 7, 8, 9 with exit-1 confidences .9 .75 .9
    # .6: the 2nd is 0.9, samples 6 and 8 leave. 7 and 9 reach the end.
    assert policies.budgeted_thresholds(val, 0.5).tolist() == [0.8, 0.9, -1e8]
    d = policies.decide(PolicyHparams(name="budgeted", q=0.5), val)
    assert d.answer.tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 1, 2]
    assert policies.evaluate(val, d, MACS).exit_fractions == (0.6, 0.2, 0.2)
    # q = 1.95: pi = (1.95, 3.8025, 7.414875) / 13.167375 -> m = 1, 2; T_0 = 0.9 (sample 0); the 2nd exit-1
    # confidence among 1..9 is 0.9, a tie: samples 6 and 8 leave along with 1 (three for a budget of two).
    assert policies.budgeted_thresholds(val, 1.95).tolist() == [0.9, 0.9, -1e8]


def test_budgeted_share_rounding_to_zero_lets_nobody_exit():
    val = _two_class(CONF_VAL)
    # q = 0.1: pi = (.1, .01, .001) / .111 -> m = floor(9.009) = 9, floor(0.9009) = 0: exit 1 gets T = 1e8.
    tau = policies.budgeted_thresholds(val, 0.1)
    assert tau.tolist() == [0.6, 1e8, -1e8]
    out = policies.evaluate(val, policies.decide(PolicyHparams(name="budgeted", q=0.1), val), MACS)
    assert out.exit_fractions == (0.9, 0.0, 0.1)
    assert out.macs == pytest.approx(0.9 * 10 + 0.1 * 60)  # the sample that never exits pays every head


def test_budgeted_thresholds_come_from_validation_and_apply_to_test():
    val = _two_class(CONF_VAL)
    # thresholds (0.8, 0.9): 0.8 exits at 0 (>=), 0.79 then 0.95 at 1, 0.5 then 0.89 at the end
    test = _two_class(np.array([[0.8, 0.79, 0.5, 0.6], [0.6, 0.95, 0.89, 0.6], [0.9, 0.9, 0.4, 0.3]]),
                      labels=np.array([0, 0, 0, 1]))
    policy = PolicyHparams(name="budgeted", q=0.5)
    d = policies.decide(policy, test, calib=val)
    assert d.answer.tolist() == [0, 1, 2, 2]
    out = policies.operating_point(policy, test, MACS, calib=val)
    assert out.acc == pytest.approx(0.75)  # sample 2 answers class 1 at the end (0.4), sample 3 is right there
    assert out.macs == pytest.approx((10 + 25 + 60 + 60) / 4)


def _official_walk(conf: np.ndarray, q: float) -> list[float]:
    """A literal transcription of the official per-sample loop (counting not-yet-exited samples one by one)."""
    k_total, n = conf.shape
    p = np.array([q ** (k + 1) for k in range(k_total)])
    p = p / p.sum()
    filtered = np.zeros(n)
    tau = [1e8] * k_total
    for k in range(k_total - 1):
        order = sorted(range(n), key=lambda i: -conf[k, i])
        m = int(np.floor(n * p[k] + 1e-9))
        count = 0
        for i in order:
            if filtered[i] == 0:
                count += 1
                if count == m:
                    tau[k] = conf[k, i]
                    break
        filtered += conf[k] >= tau[k]
    tau[-1] = -1e8
    return tau


@pytest.mark.parametrize("seed", range(5))
def test_budgeted_thresholds_match_the_official_walk_on_random_caches(seed):
    rng = np.random.default_rng(seed)
    conf = np.round(rng.uniform(0.5, 1.0, size=(4, 200)), 2)  # rounded: many ties
    val = _two_class(conf)
    for q in policies.BUDGETED_GRID:
        assert policies.budgeted_thresholds(val, q).tolist() == _official_walk(conf, q), q


def test_frontier_families_and_operating_budgeted_point_reproduce_through_best():
    from study.queries import point_config

    val = _two_class(CONF_VAL)
    df = policies.frontier(val, val, MACS, families=("budgeted", "entropy", "sdn"),
                           operating=PolicyHparams(name="budgeted", q=0.5))
    counts = df["policy"].value_counts().to_dict()
    assert counts == {"static": 3, "budgeted": 39 + 1, "entropy": len(policies.ENTROPY_FRACTIONS),
                      "sdn": len(policies.SDN_GRID)}
    row = df[df["operating"]].iloc[0]
    assert row["param"] == 0.5 and json.loads(row["thresholds"]) == [0.8, 0.9, -1e8]
    assert json.loads(row["exit_fractions"]) == [0.6, 0.2, 0.2]
    for _, r in df.iterrows():  # every point's expected MACs is sum fraction x cumulative MACs
        assert r["macs"] == pytest.approx(np.dot(json.loads(r["exit_fractions"]), MACS))
    cfg = point_config(row.copy().rename(None).to_frame().T.assign(params=[{"method": "msdnet"}]).iloc[0])
    assert cfg == {"method": "msdnet", "policy.name": "budgeted", "policy.q": 0.5}
    ent = df[df["policy"] == "entropy"].iloc[3]
    cfg = point_config(ent.copy().rename(None).to_frame().T.assign(params=[{"method": "sdn"}]).iloc[0])
    assert cfg["policy.name"] == "entropy" and cfg["policy.entropy"] == pytest.approx(0.02 * np.log(2), abs=1e-6)


def test_a_method_brings_its_default_policy_and_the_user_key_wins():
    from trainables.config import TrialConfig

    assert TrialConfig.from_flat({"method": "sdn", "model.depth": 20}).policy.name == "sdn"
    chosen = TrialConfig.from_flat({"method": "sdn", "model.depth": 20, "policy.name": "entropy"})
    assert chosen.policy.name == "entropy"
    assert TrialConfig.from_flat({"method": "elastic"}).policy.name == "confidence"


def test_every_trial_frontier_includes_the_budgeted_batch_grid_unless_told_otherwise():
    assert policies.frontier_families(PolicyHparams()) == ("confidence", "budgeted")
    assert policies.frontier_families(PolicyHparams(name="budgeted")) == ("budgeted",)
    assert policies.frontier_families(PolicyHparams(name="sdn", grid=("entropy",))) == ("entropy",)
