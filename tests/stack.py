"""Helpers of the end-to-end tests: the `dynastudy` command in a subprocess, MLflow queries, and the multi-method
study that issue 4's test checks and the dashboard's browser test reads (built once per session)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow


def clean_env() -> dict[str, str]:
    # mlflow.set_tracking_uri() in this process also sets MLFLOW_TRACKING_URI: a command must not inherit it.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def dynastudy(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "study.cli", *args], capture_output=True, text=True, env=clean_env(),
                       timeout=timeout)
    assert r.returncode == 0, f"dynastudy {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`dynastudy ARGS` in this process (the `main` the command runs, without a new interpreter's start-up):
    exit code, stdout, stderr."""
    from study.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def search_runs(uri: str, experiment: str, filter_string: str = "") -> list:
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string, output_format="list")
    finally:
        mlflow.set_tracking_uri(previous)


def dyn_common(res: Path, cifar_dir: Path) -> list[str]:
    return ["--study", "dyn", "--dataset", "cifar10", "--data-dir", str(cifar_dir), "--subset", "500",
            "--epochs", "1", "--set", "model.depth=20", "--set", "data.val_size=1000",
            "--set", "data.test_subset=1000", "--results-dir", str(res)]


def build_dyn_study(res: Path, cifar_dir: Path) -> dict:
    """Issue 4's study: aig swept (2 trials), resnet and elastic trained once each with `run` (no Ray start-up),
    then the lesion study on the resnet trial and on one aig trial. Returns the lesion outputs by method."""
    uri = f"sqlite:///{res}/mlflow.db"
    common = dyn_common(res, cifar_dir)
    dynastudy("sweep", "--method", "aig", "--trials", "2", "--concurrency", "2", *common)
    for method in ("resnet", "elastic"):
        dynastudy("run", "--method", method, *common)
    by_method = {r.data.tags["dynastudy.method"]: r
                 for r in search_runs(uri, "dyn", "tags.`dynastudy.kind` != 'sweep'")}
    lesions = {}
    for method in ("resnet", "aig"):
        lesions[method] = json.loads(dynastudy(
            "lesion", "--run-id", by_method[method].info.run_id, "--blocks", "0,4", "--random-k", "2", "--repeats",
            "2", "--reorder-swaps", "1", "--format", "json", "--data-dir", str(cifar_dir), "--results-dir",
            str(res)).stdout)
    return {"res": res, "uri": uri, "lesions": lesions, "lesioned": {m: by_method[m].info.run_id for m in lesions}}


def cluster_folder() -> Path:
    """What a local cluster (study/localcluster.py) needs, else skip (fail under CI=true): PostgreSQL's server
    programs and psycopg2. Returns a new folder for it: short (Ray's socket paths) and searchable by the
    `postgres` user when run as root, so not under pytest's tmp."""
    import tempfile

    import pytest

    from study.localcluster import find_postgres_bin

    missing = "PostgreSQL" if find_postgres_bin() is None else None
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        missing = missing or "psycopg2"
    if missing:
        message = f"{missing} is not installed (Debian: apt-get install postgresql; pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    folder = Path(tempfile.mkdtemp(prefix="dsc-", dir="/tmp"))
    if os.geteuid() == 0:
        folder.chmod(0o711)
    return folder
