"""The command line: bad input is one line on stderr, exit code 2, and nothing written; `describe` cards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from study.cli import main


def _sweep(tmp_path, *extra):
    return ["sweep", "--method", "elastic", "--study", "s", "--dataset", "synthetic", "--trials", "1",
            "--results-dir", str(tmp_path / "res"), *extra]


@pytest.mark.parametrize("extra, fragment", [
    (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'; valid keys: optim.epochs"),
    (["--set", "optim.lr=50"], "optim.lr=50.0 is outside the allowed range [1e-06, 10.0]"),
    (["--set", "model.depth=21"], "model.depth=21 is not one of: 20, 32, 56, 110"),
    (["--set", "nokey"], "--set 'nokey' is not key=value"),
    (["--sampler", "cmaes"], "invalid choice: 'cmaes'"),
    (["--scheduler", "pbt"], "invalid choice: 'pbt'"),
    (["--ask-ahead", "always"], "invalid choice: 'always' (choose from 'auto', 'on', 'off')"),
    (["--trials", "0"], "--trials=0 must be at least 1"),
    (["--population", "10"], "--population=10 is NSGA-II's; it needs --sampler nsga2, not tpe"),
    (["--sampler", "nsga2", "--population", "1"], "--population=1 must be at least 2"),
    (["--tracking-uri", "http://127.0.0.1:9"], "tracking server http://127.0.0.1:9 is unreachable"),
    (["--tracking-uri", "bogus://x"], "tracking URI 'bogus://x' is not supported; valid: sqlite:"),
    (["--tracking-uri", "file:///tmp/mlruns"], "tracking URI 'file:///tmp/mlruns' is not supported"),
    (["--tracking-uri", "postgresql://u@127.0.0.1:9/db"], "tracking store postgresql://u@127.0.0.1:9/db is unusable"),
    (["--max-failures", "-1"], "--max-failures=-1 must be 0 or more"),
    (["--cpus-per-trial", "512"], "--cpus-per-trial=512.0 is more than this machine's"),
    (["--gpus-per-trial", "99"], "--gpus-per-trial=99.0 is more than this machine's"),
    (["--set", "data.val_size=0"], "data.val_size=0 is outside the allowed range [1, None]"),
    (["--storage", "not a url"], "storage 'not a url' is not a database URL"),
    (["--storage", "sqlite:///relative.db"], "must name an absolute path"),
    (["--choice", "policy.name=budgeted,nope"], "--choice policy.name='nope' with method elastic: policy.name='nope' "
                                                "is not one of: confidence, static, budgeted, entropy, sdn"),
    (["--choice", "model.depth=20", "--set", "model.depth=20"], "--choice model.depth is also fixed"),
    (["--choice", "model.depth=20,20"], "--choice model.depth needs one or more distinct values; got [20, 20] "
                                        "(20 repeated)"),
    (["--choice", "method=resnet,vgg"], "--choice method=... is not searchable"),
    (["--choice", "model.depth=20", "--choice", "model.depth=32"], "--choice model.depth is given twice"),
    (["--choice", "model.nope=1,2"], "--choice model.nope=1 with method elastic: unknown config key 'model.nope'"),
    (["--choice", "policy.name"], "--choice 'policy.name' is not key=value1,value2,..."),
    (["--storage-path", "rel/ray"], "--storage-path 'rel/ray' must be an absolute path"),
    (["--storage-path", "ftp://host/x"], "scheme 'ftp' is not supported; valid: an absolute path, s3://"),
    (["--tracking-timeout", "-1"], "--tracking-timeout=-1.0 must be 0 or more seconds"),
    (["--objective", "latency_s"], "--objective 'latency_s' is not reported by every method of ['elastic']; "
                                   "valid: macs"),
    (["--objective", "flops"], "invalid choice: 'flops' (choose from 'macs', 'latency_s', 'params_m')"),
])
def test_bad_sweep_input(tmp_path, capsys, extra, fragment):
    assert main(_sweep(tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynastudy: error: ") and fragment in err and "\n" not in err
    assert not (tmp_path / "res").exists()


def test_unknown_method_and_dataset(tmp_path, capsys):
    assert main(["sweep", "--method", "nope", "--study", "s", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope' (choose from" in err and "resnet" in err and "elastic" in err
    assert main(["describe", "--method", "resnet", "--dataset", "mnist"]) == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_malformed_yaml_and_missing_data(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [0.1\n")
    assert main(_sweep(tmp_path, "--config", str(bad))) == 2
    assert "is not valid YAML at line" in capsys.readouterr().err
    monkeypatch.setenv("DYNASTUDY_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["sweep", "--method", "resnet", "--study", "s", "--dataset", "cifar10", "--data-dir", str(empty),
            "--results-dir", str(tmp_path / "res")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"no cifar10 data in {empty}" in err and "DYNASTUDY_DATA" in err
    assert not (tmp_path / "res").exists() and not any(empty.iterdir())


def test_a_file_that_is_no_database_and_a_missing_data_dir(tmp_path, capsys):
    junk = tmp_path / "junk.db"
    junk.write_text("not a database")
    assert main(_sweep(tmp_path, "--tracking-uri", f"sqlite:///{junk}")) == 2
    assert f"tracking store sqlite:///{junk} is unusable (DatabaseError" in capsys.readouterr().err
    args = ["sweep", "--method", "resnet", "--study", "s", "--data-dir", str(tmp_path / "nowhere"),
            "--results-dir", str(tmp_path / "res")]
    assert main(args) == 2
    assert f"data directory {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "res").exists() and not (tmp_path / "nowhere").exists()


def test_sizes_that_do_not_fit_the_dataset_fail_before_any_run(tmp_path, capsys):
    # synthetic has 2,000 training images: the default 5,000-image validation split cannot be carved from it.
    assert main(["sweep", "--method", "resnet", "--study", "s", "--dataset", "synthetic",
                 "--results-dir", str(tmp_path / "res")]) == 2
    assert "data.val_size=5000 leaves no training images (synthetic has 2000)" in capsys.readouterr().err
    assert not list((tmp_path / "res").glob("*.db"))


def test_pareto_output_is_checked_before_reading(tmp_path, capsys):
    assert main(["pareto", "--study", "x", "--format", "parquet", "--results-dir", str(tmp_path)]) == 2
    assert "--format parquet needs --out FILE" in capsys.readouterr().err
    assert main(["pareto", "--study", "x", "--out", str(tmp_path / "no" / "x.json"),
                 "--results-dir", str(tmp_path)]) == 2
    assert "the folder" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_queries_on_missing_store_or_study(tmp_path, capsys):
    for cmd in (["pareto", "--study", "nope"], ["best", "--study", "nope", "--max-macs", "1e7"]):
        assert main([*cmd, "--results-dir", str(tmp_path / "res")]) == 2
        assert "no tracking store at sqlite:///" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()
    assert main(["best", "--study", "x", "--results-dir", str(tmp_path)]) == 2
    assert "one of the arguments --max-macs --min-acc is required" in capsys.readouterr().err


def test_describe_json_card(capsys):
    assert main(["describe", "--method", "elastic", "--set", "model.depth=32", "--format", "json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["method"] == "elastic" and len(card["exits"]) == 15
    assert card["exits"][-1]["macs"] == card["macs"] == sum(b["macs"] for b in card["blocks"])
    assert card["params"] > 0 and [e["exit"] for e in card["exits"]] == list(range(15))


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "study.cli", "pareto", "--study", "x", "--results-dir",
                        str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stdout == ""


def test_resume_needs_an_interrupted_sweep(tmp_path, capsys, monkeypatch):
    from study.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # an earlier mlflow.set_tracking_uri() sets it

    res = tmp_path / "res"
    assert main(["resume", "--study", "s", "--results-dir", str(res)]) == 2
    assert "no tracking store at sqlite:///" in capsys.readouterr().err and not res.exists()
    res.mkdir()
    tracker = Tracker(f"sqlite:///{res}/mlflow.db")
    exp = tracker.ensure_experiment("done", res / "mlartifacts")
    tracker.finish(tracker.start_sweep(exp, "done", {"trials": 1}))
    assert main(["resume", "--study", "nope", "--results-dir", str(res)]) == 2
    assert "no study 'nope' in sqlite:///" in capsys.readouterr().err
    assert main(["resume", "--study", "done", "--results-dir", str(res)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dynastudy: error: study 'done' has no interrupted sweep to resume: its 1 sweeps all FINISHED"
    old = tracker.start_sweep(exp, "done", {"trials": 1})  # RUNNING, but from before sweeps were resumable
    assert main(["resume", "--study", "done", "--results-dir", str(res)]) == 2
    assert f"sweep run {old} of study 'done' predates resumable sweeps" in capsys.readouterr().err
