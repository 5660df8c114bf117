"""Shared fixtures: seeded synthetic data for fast CPU tests, and the real CIFAR-10 folder for end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainables.config import DataHparams
from trainables.data import make_splits, synthetic

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_splits():
    """A small synthetic train/val/test split (10 classes, 32x32)."""
    return make_splits(synthetic(n_train=400, n_test=100), DataHparams(dataset="synthetic", val_size=100))


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The folder holding cifar10-jpeg.tar.gz (DYNASTUDY_DATA, else ../shared/data beside the checkout)."""
    candidates = [os.environ.get("DYNASTUDY_DATA"), str(Path(__file__).resolve().parents[2] / "shared" / "data")]
    for c in candidates:
        if c and (Path(c) / "cifar10-jpeg.tar.gz").is_file():
            return Path(c)
    message = f"real CIFAR-10 not found (looked in {[c for c in candidates if c]}); set DYNASTUDY_DATA"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def shared_dataset_cache(tmp_path_factory):
    """Every command the tests start decodes CIFAR-10 into one session cache (DYNASTUDY_CACHE) instead of once per
    results folder (about 18 s each here)."""
    previous = os.environ.get("DYNASTUDY_CACHE")
    os.environ["DYNASTUDY_CACHE"] = str(tmp_path_factory.mktemp("dataset-cache"))
    yield
    if previous is None:
        os.environ.pop("DYNASTUDY_CACHE", None)
    else:
        os.environ["DYNASTUDY_CACHE"] = previous


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """One dataset cache for the whole session, so CIFAR-10 is decoded once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def dyn_study(tmp_path_factory, cifar_dir) -> dict:
    """Issue 4's multi-method study on real CIFAR-10 (see `stack.build_dyn_study`), built once: its own test
    checks it, and the dashboard's browser test reads a copy of it."""
    from stack import build_dyn_study

    return build_dyn_study(tmp_path_factory.mktemp("dyn") / "res", cifar_dir)


@pytest.fixture(scope="session")
def mlflow_tracker(tmp_path_factory):
    """One real MLflow store (SQLite) for the session's dashboard tests, each in studies of its own: creating a
    store costs seconds of schema migrations."""
    from study.tracking import Tracker

    return Tracker(f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")
