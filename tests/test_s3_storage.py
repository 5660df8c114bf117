"""Tune's storage on S3-compatible storage (`--storage-path s3://...`, issue 8's "Shared storage"): a real sweep
whose checkpoints and saved state go to a bucket of moto's S3 server on 127.0.0.1 (a real HTTP S3 endpoint, reached
through pyarrow's S3 filesystem as AWS S3 or MinIO would be), and from which `dynastudy resume` could restore it.
Skipped without moto (pip install -e '.[test]'; failed under CI=true)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stack import clean_env, search_runs
from study.localcluster import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture()
def s3(monkeypatch, tmp_path):
    """moto's S3 server on a free loopback port, a bucket `sweeps` in it, and the AWS_* variables to reach it."""
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(server).is_file():
        message = "moto's S3 server is not installed (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    log = tmp_path / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"moto_server did not start:\n{log.read_text()}")
                time.sleep(0.2)
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(k, v)
        import pyarrow.fs

        fs = pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                                     allow_bucket_creation=True)
        fs.create_dir("sweeps")
        yield port, fs, log
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _dynastudy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study.cli", *args], capture_output=True, text=True, env=clean_env(),
                          timeout=300)


def test_a_sweep_keeps_its_checkpoints_and_state_in_s3(s3, tmp_path):
    import pyarrow.fs
    from ray import tune

    from study.runner import tune_storage

    port, fs, log = s3
    res = tmp_path / "res"
    url = f"s3://sweeps/dynastudy?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    r = _dynastudy("sweep", "--method", "elastic", "--study", "s3", "--dataset", "synthetic", "--subset", "200",
                   "--epochs", "2", "--trials", "1", "--set", "model.depth=20", "--set", "data.val_size=100",
                   "--set", "data.test_subset=100", "--results-dir", str(res), "--storage-path", url)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\nS3 server log:\n{log.read_text()[-3000:]}"
    assert not (res / "ray").exists()  # nothing of Tune's on the local disk
    (run,) = search_runs(f"sqlite:///{res}/mlflow.db", "s3", "tags.`dynastudy.kind` = 'trial'")
    assert run.info.status == "FINISHED"
    files = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector("sweeps/dynastudy", recursive=True))]
    assert any(p.endswith("/state.pt") and "/checkpoint_00000" in p for p in files), files
    (sweep,) = search_runs(f"sqlite:///{res}/mlflow.db", "s3", "tags.`dynastudy.kind` = 'sweep'")
    path = sweep.data.tags["dynastudy.tune_experiment"]
    assert path.startswith("sweeps/dynastudy/s3-")
    assert tune.Tuner.can_restore(path, storage_filesystem=tune_storage(url, res)[1])  # what resume reads

    # A bucket that is not there is a one-line error before anything starts.
    r = _dynastudy("sweep", "--method", "elastic", "--study", "s3b", "--dataset", "synthetic", "--results-dir",
                   str(tmp_path / "res2"), "--storage-path", url.replace("s3://sweeps/", "s3://nobucket/"))
    assert r.returncode == 2 and "bucket 'nobucket' does not exist" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "res2").exists()
