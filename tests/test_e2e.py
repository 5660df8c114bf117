"""End to end through the real stack: the `dynastudy` command, local Ray, Optuna in SQLite, MLflow in SQLite.

The first test sweeps real CIFAR-10 (a small subset, one epoch) and checks MLflow through `mlflow.search_runs`,
`pareto --format json`, `best`, replaying the best config with `run`, and the Optuna study. The second runs
ASHA over two methods on synthetic data and checks that early-stopped trials are PRUNED in Optuna and closed in
MLflow, and that a second sweep continues the same study. Then divergence, Ctrl-C, and issue 4's path: `aig`
swept into one study with `resnet` and `elastic`, one Pareto front, `best` for aig, and the lesion study. Last,
issue 6's: `dhm` swept and the resnet / dsl / dhm comparison benchmark run into one study; issue 7's: a
`lottery` sweep with a level per Tune step, its per-level frontier next to another method, and `lottery-compare`;
issue 5's: msdnet, sdn and elastic on two backbones in one study, budgeted-batch frontiers, one front, `best`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from study.search import config_keys
from trainables.config import TrialConfig

from stack import clean_env, dynastudy, search_runs

pytestmark = pytest.mark.e2e


def test_real_sweep_on_cifar10(tmp_path, cifar_dir):
    res = tmp_path / "res"
    uri = f"sqlite:///{res}/mlflow.db"
    out = dynastudy("sweep", "--method", "elastic", "--study", "e2e", "--dataset", "cifar10", "--data-dir",
                    str(cifar_dir), "--subset", "500", "--epochs", "1", "--trials", "4", "--concurrency", "2",
                    "--set", "model.depth=20", "--set", "data.val_size=1000", "--set", "data.test_subset=1000",
                    "--results-dir", str(res)).stdout
    assert "[4/4] trial" in out and "4 complete" in out and "Pareto front of study 'e2e'" in out

    # MLflow: one parent run, four child runs with the whole layout.
    runs = search_runs(uri, "e2e")
    parents = [r for r in runs if r.data.tags.get("dynastudy.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("dynastudy.kind") == "trial"]
    assert len(parents) == 1 and len(trials) == 4
    parent_id = parents[0].info.run_id
    assert parents[0].info.status == "FINISHED" and parents[0].data.metrics["trials_complete"] == 4
    client = mlflow.MlflowClient(uri)
    keys = set(TrialConfig.valid_keys("elastic"))
    for run in trials:
        tags, metrics = run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED" and tags["mlflow.parentRunId"] == parent_id
        assert tags["dynastudy.study"] == "e2e" and tags["dynastudy.method"] == "elastic"
        assert tags["dynastudy.trial"] and len(tags["dynastudy.config_hash"]) == 12
        assert set(run.data.params) == keys
        cfg = TrialConfig.from_flat({k: yaml.safe_load(v) for k, v in run.data.params.items()})
        assert cfg.config_hash() == tags["dynastudy.config_hash"] and cfg.data.subset == 500
        for k in range(9):
            assert 0 <= metrics[f"val_acc_exit_{k}"] <= 1 and metrics[f"macs_exit_{k}"] > 0
        assert metrics["macs_exit_8"] == metrics["macs_full"] == 40_815_904
        assert 0 < metrics["macs"] <= metrics["macs_full"] and 0 <= metrics["test_acc"] <= 1
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"frontier.parquet", "cost.json", "config.yaml"} <= names

    # pareto --format json reads the frontiers back from MLflow.
    points = json.loads(dynastudy("pareto", "--study", "e2e", "--format", "json", "--results-dir", str(res)).stdout)
    assert points and {"method", "run_id", "val_acc", "test_acc", "macs", "params", "policy"} <= set(points[0])
    assert all(a["macs"] <= b["macs"] and a["val_acc"] < b["val_acc"] for a, b in zip(points, points[1:]))
    assert {p["run_id"] for p in points} <= {r.info.run_id for r in trials}

    # best under a budget, as a config that replays.
    budget = 2.5e7
    best = json.loads(dynastudy("best", "--study", "e2e", "--max-macs", str(budget), "--format", "json",
                                "--results-dir", str(res)).stdout)
    assert best["macs"] <= budget
    frontier_max = max(p["val_acc"] for p in points if p["macs"] <= budget)
    assert best["val_acc"] == pytest.approx(frontier_max)
    cfg_file = tmp_path / "best.yaml"
    cfg_file.write_text(dynastudy("best", "--study", "e2e", "--max-macs", str(budget),
                                  "--results-dir", str(res)).stdout)
    replay = TrialConfig.from_flat(yaml.safe_load(cfg_file.read_text()))
    assert replay.policy.name in ("static", "confidence")
    run_out = dynastudy("run", "--config", str(cfg_file), "--study", "e2e", "--data-dir", str(cifar_dir),
                        "--threads", "2", "--results-dir", str(res)).stdout
    assert "test_acc=" in run_out
    replays = search_runs(uri, "e2e", "tags.`dynastudy.kind` = 'run'")
    assert len(replays) == 1 and replays[0].data.tags["dynastudy.config_hash"] == replay.config_hash()
    assert replays[0].data.metrics["macs"] <= budget * 1.5  # same operating point, re-trained

    # Optuna: every trial COMPLETE with both objectives, joined to MLflow by run id.
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{res}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in trials}
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]


def test_asha_prunes_and_a_second_sweep_continues_the_study(tmp_path):
    res = tmp_path / "res"
    common = ["--method", "elastic", "--method", "resnet", "--study", "asha", "--dataset", "synthetic",
              "--set", "data.val_size=200", "--set", "model.depth=20", "--set", "data.subset=600",
              "--results-dir", str(res)]
    # 8 trials of 3 epochs: ASHA (grace 1, reduction 2) compares them at epochs 1 and 2.
    out = dynastudy("sweep", *common, "--trials", "8", "--epochs", "3", "--scheduler", "asha", "--sampler",
                    "random").stdout
    assert "[8/8] trial" in out
    storage = f"sqlite:///{res}/optuna.db"
    trials = optuna.load_study(study_name="asha", storage=storage).trials
    states = [t.state.name for t in trials]
    assert set(states) <= {"COMPLETE", "PRUNED"} and "PRUNED" in states and "COMPLETE" in states
    assert all(config_keys(t.params)["method"] in ("elastic", "resnet") for t in trials)
    runs = search_runs(f"sqlite:///{res}/mlflow.db", "asha", "tags.`dynastudy.kind` = 'trial'")
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    stopped = {r.info.run_id for r in runs if "dynastudy.stopped_early" in r.data.tags}
    pruned = {t.user_attrs["mlflow_run_id"] for t in trials if t.state.name == "PRUNED"}
    assert stopped == pruned

    # Same sampler and seed again: the seed is offset by the trials already there, so nothing is replayed.
    out = dynastudy("sweep", *common, "--trials", "2", "--epochs", "1", "--sampler", "random").stdout
    assert "already has 8 trials" in out
    trials = optuna.load_study(study_name="asha", storage=storage).trials
    assert len(trials) == 10
    assert {tuple(sorted(t.params.items())) for t in trials[8:]}.isdisjoint(
        {tuple(sorted(t.params.items())) for t in trials[:8]})


# Loaded by every Python process of the sweep (Ray workers inherit PYTHONPATH): makes resnet's loss NaN, so the
# real divergence path runs end to end without any test hook in the product.
_NAN_LOSS = '''
import importlib.abc, importlib.util, sys

class _NanResnetLoss(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "trainables.methods.resnet":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            real = module.loss
            module.loss = lambda out, y, hp, ls=0.0: real(out, y, hp, ls) * float("nan")

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _NanResnetLoss())
'''


def test_diverging_trials_fail_with_their_reason_and_the_sweep_goes_on(tmp_path, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_NAN_LOSS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    res = tmp_path / "res"
    out = dynastudy("sweep", "--method", "elastic", "--method", "resnet", "--study", "nan", "--dataset",
                    "synthetic", "--trials", "4", "--epochs", "1", "--sampler", "random", "--seed", "3",
                    "--set", "data.val_size=200", "--set", "model.depth=20", "--set", "data.subset=400",
                    "--results-dir", str(res)).stdout
    runs = search_runs(f"sqlite:///{res}/mlflow.db", "nan", "tags.`dynastudy.kind` = 'trial'")
    by_method = {m: [r for r in runs if r.data.tags["dynastudy.method"] == m] for m in ("elastic", "resnet")}
    assert by_method["elastic"] and by_method["resnet"] and len(runs) == 4
    assert all(r.info.status == "FINISHED" for r in by_method["elastic"])
    for r in by_method["resnet"]:
        assert r.info.status == "FAILED" and "training loss is nan" in r.data.tags["dynastudy.fail_reason"]
    assert f"{len(by_method['resnet'])} failed" in out and "diverged" in out
    trials = optuna.load_study(study_name="nan", storage=f"sqlite:///{res}/optuna.db").trials
    states = {config_keys(t.params)["method"]: set() for t in trials}
    for t in trials:
        states[config_keys(t.params)["method"]].add(t.state.name)
    assert states == {"elastic": {"COMPLETE"}, "resnet": {"FAIL"}}
    assert all("training loss is nan" in t.user_attrs["fail_reason"] for t in trials if t.state.name == "FAIL")


def _trial_runs_started(db: Path) -> bool:
    """Read-only look into the sweep's MLflow database. (Opening it through MLflow while the sweep is still
    creating its tables would race the sweep's schema migration.)"""
    import sqlite3

    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            (n,) = conn.execute("select count(*) from tags where key = 'dynastudy.kind' and value = 'trial'").fetchone()
        return n > 0
    except sqlite3.OperationalError:  # tables not there yet, or locked
        return False


def test_ctrl_c_leaves_nothing_running(tmp_path):
    import signal
    import time

    res = tmp_path / "res"
    env = clean_env()
    proc = subprocess.Popen([sys.executable, "-m", "study.cli", "sweep", "--method", "elastic", "--study", "int",
                             "--dataset", "synthetic", "--trials", "6", "--epochs", "20", "--set",
                             "data.val_size=200", "--set", "model.depth=20", "--results-dir", str(res)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    uri = f"sqlite:///{res}/mlflow.db"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # wait until trials are training, then press Ctrl-C once
            time.sleep(2)
            if _trial_runs_started(res / "mlflow.db"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "sweep interrupted" in err
    runs = search_runs(uri, "int")
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    assert {r.info.status for r in runs if r.data.tags["dynastudy.kind"] == "sweep"} == {"KILLED"}
    trials = optuna.load_study(study_name="int", storage=f"sqlite:///{res}/optuna.db").trials
    assert trials and all(t.state.name != "RUNNING" for t in trials)


def test_aig_next_to_resnet_and_elastic_then_the_lesion_study(dyn_study):
    """Issue 4's 'done means': aig swept into one study with resnet and elastic, all three on one front, the best
    aig point under a MACs budget, and the lesion study on trained residual trials, logged to their runs (the
    study is built by the `dyn_study` fixture)."""
    res, uri = dyn_study["res"], dyn_study["uri"]
    trials = search_runs(uri, "dyn", "tags.`dynastudy.kind` != 'sweep'")
    by_method = {r.data.tags["dynastudy.method"]: r for r in trials}
    assert len(trials) == 4 and set(by_method) == {"aig", "resnet", "elastic"}
    client = mlflow.MlflowClient(uri)
    for run in (r for r in trials if r.data.tags["dynastudy.method"] == "aig"):
        m = run.data.metrics
        rates = [m[f"gate_rate_{l}"] for l in range(9)]
        assert all(0 <= r <= 1 for r in rates) and m["gate_rate_mean"] == pytest.approx(sum(rates) / 9)
        assert 0 < m["macs"] <= m["macs_full"]
        assert {"gate_rates.parquet", "model.pt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    # One front over the three methods, and each method's own points.
    pts = json.loads(dynastudy("pareto", "--study", "dyn", "--format", "json", "--results-dir", str(res)).stdout)
    assert pts and {p["method"] for p in pts} <= {"aig", "resnet", "elastic"}
    aig_pts = json.loads(dynastudy("pareto", "--study", "dyn", "--method", "aig", "--format", "json",
                                   "--results-dir", str(res)).stdout)
    assert aig_pts and {p["method"] for p in aig_pts} == {"aig"}
    budget = max(p["macs"] for p in aig_pts)
    best = json.loads(dynastudy("best", "--study", "dyn", "--method", "aig", "--max-macs", str(budget),
                                "--format", "json", "--results-dir", str(res)).stdout)
    assert best["config"]["method"] == "aig" and best["macs"] <= budget
    assert {"model.target", "model.lam", "model.tau", "model.cutoff"} <= set(best["config"])

    # The lesion study reproduces each trial's logged test accuracy and logs its rows, summary and plot.
    for method in ("resnet", "aig"):
        run = next(r for r in trials if r.info.run_id == dyn_study["lesioned"][method])
        out = dyn_study["lesions"][method]
        assert out["reproduced"] is True
        assert out["baseline_error"] == pytest.approx(1 - run.data.metrics["test_acc_exit_0"], abs=1e-9)
        assert [r["unit"] for r in out["single"]] == [0, 4] and [r["k"] for r in out["random"]] == [1, 2]
        assert out["reorder"][0]["mean_kendall_tau"] < 1
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"lesion.parquet", "lesion.png", "lesion.json"} <= names

    # Bad lesion input: one line, exit 2, nothing logged.
    env = clean_env()
    for args, message in ((["--run-id", "0123abc"], "no run '0123abc'"),
                          (["--run-id", by_method["resnet"].info.run_id, "--blocks", "3,99"],
                           "cannot be deleted; deletable units: 0,1,2,3,4,5,6,7,8")):
        r = subprocess.run([sys.executable, "-m", "study.cli", "lesion", *args, "--results-dir", str(res)],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_dhm_sweep_and_the_resnet_dsl_dhm_comparison(tmp_path, cifar_dir):
    """Issue 6's 'done means' at toy size: dhm swept (its searched alpha, T, forks, widths), then the comparison
    benchmark trains resnet, dsl and dhm at one budget into the same study; pareto shows the three side by side
    and the benchmark's summary comes from what MLflow holds."""
    res = tmp_path / "res"
    uri = f"sqlite:///{res}/mlflow.db"
    data = ["--data-dir", str(cifar_dir), "--results-dir", str(res)]
    shared = ["--set", "model.depth=20", "--set", "data.val_size=500", "--set", "data.test_subset=500",
              "--set", "data.subset=300", "--set", "optim.epochs=1"]
    dynastudy("sweep", "--method", "dhm", "--study", "deep", "--trials", "1", "--concurrency", "1",
              "--dataset", "cifar10", *shared, *data)
    (trial,) = search_runs(uri, "deep", "tags.`dynastudy.kind` = 'trial'")
    m, params = trial.data.metrics, trial.data.params
    assert {"model.alpha", "model.temperature", "model.branches"} <= set(params)
    heads = [0] + [h for h, fork in ((1, "stage2"), (2, "stage1")) if params["model.branches"] in ("both", fork)]
    assert {f"test_acc_head_{h}" for h in heads} <= set(m) and m["test_acc_head_0"] == m["test_acc"]
    assert m["train_macs"] > m["macs_full"] == m["macs"]
    names = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(trial.info.run_id)}
    assert {"heads.parquet", "model.pt", "frontier.parquet"} <= names

    out_json = tmp_path / "compare.json"
    env = clean_env()
    bench = [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "dhm_compare.py"),
             "--study", "deep", "--seeds", "0", "--depth", "20", "--epochs", "1", "--subset", "300", "--val-size",
             "500", "--test-subset", "500", "--json", str(out_json), *data]
    r = subprocess.run(bench, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(out_json.read_text())["methods"]
    assert set(summary) == {"resnet", "dsl", "dhm"} and all(e["runs"] == 1 for e in summary.values())
    assert summary["resnet"]["macs"] == summary["dsl"]["macs"] == summary["dhm"]["macs"]  # head 0 = plain net
    assert "test_acc_head_1_mean" in summary["dhm"] and "test_acc_head_1_mean" not in summary["resnet"]
    runs = search_runs(uri, "deep", "tags.`dynastudy.kind` = 'run'")
    for run in runs:
        assert summary[run.data.tags["dynastudy.method"]]["test_acc"] == [run.data.metrics["test_acc"]]
    # A second call trains nothing: every (method, seed) is finished in the study.
    again = subprocess.run(bench, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.count("not retrained") == 3
    assert len(search_runs(uri, "deep", "tags.`dynastudy.kind` = 'run'")) == 3

    r = dynastudy("pareto", "--study", "deep", "--by-method", "--format", "json", *data[2:])
    assert {p["method"] for p in json.loads(r.stdout)} == {"resnet", "dsl", "dhm"}
    assert [line.split(":")[0] for line in r.stderr.splitlines() if "hypervolume" in line] == ["dhm", "dsl", "resnet"]


def test_lottery_sweep_levels_frontier_and_compare(tmp_path, cifar_dir):
    """Issue 7's 'done means' at toy size: lottery swept (f and warm-up searched; k fixed small enough for a
    4-step epoch), each level a reported step with density, accuracy and sparse MACs in MLflow; every level's
    point on the study's Pareto plot next to resnet; the ticket against both controls from one command."""
    res = tmp_path / "res"
    uri = f"sqlite:///{res}/mlflow.db"
    common = ["--study", "lt", "--dataset", "cifar10", "--data-dir", str(cifar_dir), "--subset", "500",
              "--epochs", "1", "--set", "data.val_size=500", "--set", "data.test_subset=500", "--results-dir",
              str(res)]
    out = dynastudy("sweep", "--method", "lottery", "--trials", "1", "--concurrency", "1", "--set",
                    "model.levels=2", "--set", "model.rewind_step=2", "--set", "model.controls=both", *common).stdout
    assert out.count(" complete ") == 1, out
    dynastudy("run", "--method", "resnet", "--set", "model.depth=20", *common)  # the dense baseline, no Ray
    client = mlflow.MlflowClient(uri)
    trials = search_runs(uri, "lt", "tags.`dynastudy.method` = 'lottery'")
    assert len(trials) == 1
    for run in trials:
        rid, params = run.info.run_id, run.data.params
        f = float(params["model.prune_fraction"])
        density = [m.value for m in sorted(client.get_metric_history(rid, "density"), key=lambda m: m.step)]
        assert [m.step for m in client.get_metric_history(rid, "level")] == [1, 2, 3]
        assert density[0] == 1.0 and density[1] == pytest.approx(1 - f, abs=1e-3)
        assert density[2] == pytest.approx((1 - f) ** 2, abs=1e-3)
        sparse = [m.value for m in sorted(client.get_metric_history(rid, "sparse_macs"), key=lambda m: m.step)]
        assert sparse[0] == run.data.metrics["dense_macs"] > sparse[1] > sparse[2] == run.data.metrics["macs"]
        assert {"lottery.parquet", "lottery_layers.parquet", "frontier.parquet"} <= \
            {a.path for a in client.list_artifacts(rid)}

    pts = json.loads(dynastudy("pareto", "--study", "lt", "--by-method", "--format", "json",
                               "--results-dir", str(res)).stdout)
    assert {p["method"] for p in pts} == {"lottery", "resnet"}
    every = json.loads(dynastudy("pareto", "--study", "lt", "--all", "--method", "lottery", "--format", "json",
                                 "--results-dir", str(res)).stdout)
    assert len(every) == 3 and sorted({p["run_id"] for p in every}) == sorted(t.info.run_id for t in trials)
    assert sum(p["macs"] < 40.8e6 for p in every) == 2  # the pruned levels are cheaper than the dense network
    best = json.loads(dynastudy("best", "--study", "lt", "--method", "lottery", "--max-macs", "1e12", "--format",
                                "json", "--results-dir", str(res)).stdout)
    assert best["config"]["method"] == "lottery" and best["config"]["model.levels"] in (0, 1, 2)

    cmp = json.loads(dynastudy("lottery-compare", "--run-id", trials[0].info.run_id, "--format", "json",
                               "--results-dir", str(res)).stdout)
    levels = cmp["levels"]
    assert [r["level"] for r in levels] == [0, 1, 2] and cmp["note"] == ""
    for r in levels[1:]:
        assert all(0 <= r[k] <= 1 for k in ("val_acc", "reinit_val_acc", "random_mask_val_acc"))
    env = clean_env()
    resnet_run = search_runs(uri, "lt", "tags.`dynastudy.method` = 'resnet'")[0].info.run_id
    r = subprocess.run([sys.executable, "-m", "study.cli", "lottery-compare", "--run-id", resnet_run,
                        "--results-dir", str(res)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "is not a finished lottery trial" in r.stderr


def test_early_exit_family_on_one_study(tmp_path, cifar_dir):
    """Issue 5's 'done means' at toy size: msdnet, sdn and elastic on two backbones swept together into one study;
    every msdnet trial's frontier holds the 39 budgeted-batch points (thresholds from validation, applied to test)
    and its anytime per-exit accuracies; one Pareto front over all of them; `best` under a MACs budget returns a
    config that names its policy and the policy's parameter."""
    res = tmp_path / "res"
    uri = f"sqlite:///{res}/mlflow.db"
    common = ["--study", "ee", "--dataset", "cifar10", "--data-dir", str(cifar_dir), "--subset", "300",
              "--epochs", "1", "--set", "data.val_size=300", "--set", "data.test_subset=300", "--results-dir",
              str(res)]
    # One sweep over the three methods; keys qualified with a method apply to it alone (sdn's and elastic's
    # model.backbone differ). TPE's random start-up with this seed draws all three methods and both backbones in
    # four trials (checked below: a new Optuna version may draw others; then pick another seed).
    tiny_msdnet = [a for k, v in (("preset", "custom"), ("blocks", 3), ("step_mode", "even"), ("step", 1),
                                  ("base", 1), ("channels", 8), ("growth_rate", 4))
                   for a in ("--set", f"msdnet:model.{k}={v}")]
    out = dynastudy("sweep", "--method", "msdnet", "--method", "sdn", "--method", "elastic", "--trials", "4",
                    "--concurrency", "2", "--seed", "4", *tiny_msdnet, "--set", "sdn:model.backbone=resnet",
                    "--set", "sdn:model.depth=20", "--choice", "elastic:model.backbone=cifar_resnet,mobilenet_v2",
                    *common).stdout
    assert out.count(" complete ") == 4, out

    client = mlflow.MlflowClient(uri)
    trials = search_runs(uri, "ee", "tags.`dynastudy.kind` = 'trial'")
    by_method = {}
    for run in trials:
        by_method.setdefault(run.data.tags["dynastudy.method"], []).append(run)
    assert {m: len(r) for m, r in by_method.items()} == {"msdnet": 1, "sdn": 1, "elastic": 2}
    assert {r.data.params["model.backbone"] for r in by_method["elastic"]} == {"cifar_resnet", "mobilenet_v2"}

    (ms,) = by_method["msdnet"]
    m = ms.data.metrics
    assert ms.data.params["policy.name"] == "budgeted" and {f"test_acc_exit_{k}" for k in range(3)} <= set(m)
    local = client.download_artifacts(ms.info.run_id, "frontier.parquet", str(tmp_path))
    import pandas as pd

    frontier = pd.read_parquet(local)
    budgeted = frontier[(frontier["policy"] == "budgeted") & ~frontier["operating"]]
    assert len(budgeted) == 39 and budgeted["param"].tolist() == [p / 20 for p in range(1, 40)]
    for row in budgeted.itertuples():
        tau = json.loads(row.thresholds)
        assert len(tau) == 3 and tau[-1] == -1e8
        fractions = json.loads(row.exit_fractions)
        assert sum(fractions) == pytest.approx(1.0)
        assert row.macs == pytest.approx(sum(f * m[f"macs_exit_{k}"] for k, f in enumerate(fractions)), rel=1e-9)
    static = frontier[frontier["policy"] == "static"].sort_values("exit")
    assert static["test_acc"].tolist() == pytest.approx([m[f"test_acc_exit_{k}"] for k in range(3)])

    (sd,) = by_method["sdn"]
    assert sd.data.params["policy.name"] == "sdn"
    for run in by_method["elastic"]:
        name = run.data.params["policy.name"]
        f = pd.read_parquet(client.download_artifacts(run.info.run_id, "frontier.parquet",
                                                      str(tmp_path / run.info.run_id)))
        assert set(f["policy"]) == {"static", name, "budgeted"}  # every trial has a budgeted-batch frontier

    pts = json.loads(dynastudy("pareto", "--study", "ee", "--all", "--format", "json", "--results-dir",
                               str(res)).stdout)
    assert {p["method"] for p in pts} == {"msdnet", "sdn", "elastic"}
    budget = sorted(p["macs"] for p in pts)[len(pts) // 2]
    best = json.loads(dynastudy("best", "--study", "ee", "--max-macs", str(budget), "--format", "json",
                                "--results-dir", str(res)).stdout)
    assert best["macs"] <= budget
    assert best["val_acc"] == max(p["val_acc"] for p in pts if p["macs"] <= budget)
    config = best["config"]
    assert config["policy.name"] in ("static", "confidence", "budgeted", "entropy", "sdn")
    if config["policy.name"] == "budgeted":
        assert 0.05 <= config["policy.q"] <= 1.95
    TrialConfig.from_flat(config)  # a valid config to re-run
    best_ms = json.loads(dynastudy("best", "--study", "ee", "--method", "msdnet", "--max-macs", "1e12", "--format",
                                   "json", "--results-dir", str(res)).stdout)
    assert best_ms["config"]["method"] == "msdnet"
