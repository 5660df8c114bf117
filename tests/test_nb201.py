"""`nb201`: the NAS-Bench-201 network matches the benchmark's tables, lookups, simulated durations, and a real
sweep (Ray + Optuna + MLflow) that searches accuracy vs the table's latency."""

from __future__ import annotations

import math
import time

import numpy as np
import optuna
import pytest

from trainables import cost as cost_lib
from trainables.config import TrialConfig
from trainables.hparams import ConfigError
from trainables.methods import nb201

ALL_3X3 = ["nor_conv_3x3"] * 6


def _cfg(**flat):
    return TrialConfig.from_flat({"method": "nb201", **flat})


@pytest.mark.parametrize("name", list(nb201.TABLES))
def test_network_parameters_are_the_tables_model_size_for_every_cell(name):
    # Every edge computes, so the count depends on the numbers of 3x3 and 1x1 convolutions only (28 networks);
    # the table records a model size per training run, and the real network's count must be one of them.
    sizes = {}
    for key, row in nb201.table(name).items():
        n3, n1 = key.count(str(nb201.OPS.index("nor_conv_3x3"))), key.count(str(nb201.OPS.index("nor_conv_1x1")))
        if (n3, n1) not in sizes:
            ops = ("nor_conv_3x3",) * n3 + ("nor_conv_1x1",) * n1 + ("none",) * (6 - n3 - n1)
            net = nb201.NB201Network(ops, nb201.TABLES[name][1])
            sizes[n3, n1] = sum(p.numel() for p in net.parameters()) / 1e6
        assert any(math.isclose(sizes[n3, n1], s, abs_tol=1e-9) for s in row["model_size"]), key
    assert len(sizes) == 28 and len(nb201.table(name)) == 5 ** 6


def test_macs_of_the_all_3x3_cell_by_hand():
    # CIFAR: stem 32*32*3*16*9; 5 cells x 6 edges per stage, each H*W*C*C*9 = 2,359,296 at (32,16), (16,32),
    # (8,64); two reductions (3x3 stride 2, 3x3, 1x1 after pooling) of 3,670,016 each; the classifier 64*10.
    card, params = nb201.measured(_cfg(**{"model.ops": ALL_3X3}).model)
    assert card.total == 442_368 + 90 * 2_359_296 + 2 * 3_670_016 + 640 == 220_119_680
    assert card.exits == (card.total,) and params == 1_531_546
    # the cheapest cell (no convolution) pays for stem, reductions and classifier only
    assert nb201.measured(_cfg(**{"model.ops": ["skip_connect"] * 6}).model)[0].total == 442_368 + 2 * 3_670_016 + 640
    # ImageNet16-120: 16 px inputs and 120 classes
    assert nb201.measured(_cfg(**{"model.table": "imagenet16-120", "model.ops": ALL_3X3}).model)[0].total == \
        (442_368 + 90 * 2_359_296 + 2 * 3_670_016) // 4 + 64 * 120


def test_measured_cost_matches_the_real_network_whatever_the_arrangement():
    cfg = _cfg(**{"model.ops": ["avg_pool_3x3", "nor_conv_1x1", "none", "nor_conv_3x3", "skip_connect",
                                "nor_conv_1x1"]})
    net = nb201.build(cfg.model, 10)
    assert cost_lib.measure(net, 32).total == nb201.measured(cfg.model)[0].total
    assert sum(p.numel() for p in net.parameters()) == nb201.measured(cfg.model)[1]


def test_cost_combined_from_three_networks_is_the_measured_one():
    for n3 in range(7):
        for n1 in range(7 - n3):
            assert nb201._measured("cifar10", n3, n1) == nb201._basis("cifar10", n3, n1), (n3, n1)


def test_fit_reports_the_table_entry():
    ops = ["nor_conv_1x1", "skip_connect", "none", "nor_conv_3x3", "avg_pool_3x3", "nor_conv_3x3"]
    cfg = _cfg(**{"model.ops": ops})
    row = nb201.table("cifar10")[nb201.cell_key(tuple(ops))]
    (report,) = list(nb201.fit(cfg, None, None))
    assert report.epoch == report.epochs == 1 and report.final is not None
    m, f = report.metrics, report.final
    assert m["val_acc"] == pytest.approx(np.mean(row["val_acc"]) / 100) == f.val_acc
    assert m["latency_s"] == row["latency"][0] and m["train_time_s"] == row["train_time"][0]
    assert m["macs"] == f.macs == f.cost.total and math.isnan(f.test_acc)
    assert f.frontier[["val_acc", "macs"]].values.tolist() == [[f.val_acc, f.macs]]
    assert bool(f.frontier["operating"].iloc[0])
    # one training run instead of the mean; the index wraps around the runs the table holds
    runs = len(row["val_acc"])
    for k in (0, runs - 1, runs + 1):
        (r,) = list(nb201.fit(_cfg(**{"model.ops": ops, "model.replicate": k}), None, None))
        assert r.metrics["val_acc"] == pytest.approx(row["val_acc"][k % runs] / 100)


def test_simulated_duration():
    t0 = time.perf_counter()
    (r,) = list(nb201.fit(_cfg(**{"model.sim_seconds": 0.3}), None, None))
    assert time.perf_counter() - t0 >= 0.3 and r.metrics["sim_time_s"] == 0.3
    (r,) = list(nb201.fit(_cfg(**{"model.sim_time_scale": 1e-4}), None, None))
    assert r.metrics["sim_time_s"] == pytest.approx(r.metrics["train_time_s"] * 1e-4)


@pytest.mark.parametrize("flat, message", [
    ({"model.ops": ["nor_conv_3x3"] * 5}, "model.ops has 5 operations; a NAS-Bench-201 cell has 6 edges"),
    ({"model.ops": ["conv_5x5"] + ["none"] * 5}, "model.ops='conv_5x5' is not one of: none, skip_connect"),
    ({"model.table": "imagenet"}, "model.table='imagenet' is not one of: cifar10, cifar100, imagenet16-120"),
    ({"model.sim_seconds": 1, "model.sim_time_scale": 0.1}, "both set; give one"),
])
def test_bad_config(flat, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        _cfg(**flat)


@pytest.mark.e2e
def test_sweep_searches_accuracy_vs_latency(tmp_path, capsys):
    """A real sweep: no data directory, the Optuna study's values are each trial's table entry, and a second sweep
    with another objective is refused. Configurations are asked for ahead (study.searcher): all but the first
    come from an ask ahead, and none is asked beyond the sweep's trials."""
    from study.cli import main
    from study.search import config_keys

    res = tmp_path / "res"
    uri, storage = f"sqlite:///{res}/mlflow.db", f"sqlite:///{res}/optuna.db"  # explicit: no environment leaks in
    args = ["sweep", "--method", "nb201", "--study", "nb", "--trials", "12", "--concurrency", "2",
            "--objective", "latency_s", "--sampler", "nsga2", "--ask-ahead", "on", "--tracking-uri", uri,
            "--storage", storage, "--results-dir", str(res)]
    assert main(args) == 0
    study = optuna.load_study(study_name="nb", storage=storage)
    assert study.user_attrs["dynastudy.objectives"] == ["val_acc", "latency_s"]
    trials = study.get_trials()
    assert len(trials) == 12 and {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    for t in trials:
        entry = nb201.lookup(_cfg(**config_keys(t.params)).model)
        assert t.values == [pytest.approx(entry["val_acc"]), pytest.approx(entry["latency_s"])]
    # where the sweep's time went, on its MLflow run (benchmarks/sweep_overhead.py reads it)
    from study.tracking import TAG_KIND, Tracker

    tracker = Tracker(uri)
    (sweep,) = tracker.client.search_runs([tracker.experiment_id("nb")], filter_string=f"tags.`{TAG_KIND}` = 'sweep'")
    m = sweep.data.metrics
    assert m["optuna_suggest_s"] > 0 and m["optuna_tell_s"] > 0 and m["trials_complete"] == 12
    assert m["trials_asked_ahead"] == 11 and m["optuna_ahead_s"] > 0
    # a new trial's Optuna writes reach the database folded into fewer transactions (study.storage)
    assert 12 <= m["optuna_db_transactions"] < m["optuna_writes_queued"]
    assert sweep.data.params["population"] == "4"  # NSGA-II's, sized to the 12 trials
    assert min(m[f"trial_{k}_mean"] for k in ("setup_s", "open_s", "final_s", "end_wait_s", "fit_s")) > 0
    capsys.readouterr()
    assert main([*args, "--objective", "macs"]) == 2  # the last --objective counts
    assert "optimises ['val_acc', 'latency_s'], not ['val_acc', 'macs']" in capsys.readouterr().err
