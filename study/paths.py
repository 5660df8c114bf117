"""Where results go: every path is absolute and derived from one results root (`--results-dir`,
DYNASTUDY_HOME, else ./dynastudy-results), so Ray's per-trial working directories cannot misplace anything; the
cache may live apart (DYNASTUDY_CACHE)."""

from __future__ import annotations

import os
from pathlib import Path

RESULTS_ENV = "DYNASTUDY_HOME"
CACHE_ENV = "DYNASTUDY_CACHE"


def results_dir(arg: str | None = None) -> Path:
    return Path(arg or os.environ.get(RESULTS_ENV) or "dynastudy-results").expanduser().resolve()


def cache_dir(root: Path) -> Path:
    """Decoded datasets and downloaded frontiers: DYNASTUDY_CACHE (one cache for every results root on a machine,
    so a dataset is decoded once), else <root>/cache. Entries are keyed by content (a checksum of the source, a
    run id), so roots can share them."""
    shared = os.environ.get(CACHE_ENV)
    return Path(shared).expanduser().resolve() if shared else root / "cache"


def ray_dir(root: Path) -> Path:
    return root / "ray"


def undelivered_dir(root: Path) -> Path:
    """MLflow writes a sweep could not deliver (the tracking server down at its end), one folder per sweep run."""
    return root / "undelivered"


def artifacts_dir(root: Path) -> Path:
    return root / "mlartifacts"


def sqlite_file(url: str) -> Path | None:
    """The database file behind an `sqlite:///` URL (None for any other URL)."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def sqlite_wal(url: str) -> None:
    """Put the SQLite database behind `url` (if it is one) in write-ahead-log mode, which persists in the file:
    the sweep's driver and its trials write to it at once, and in WAL mode readers do not wait for a writer nor
    a writer for readers (benchmarks/sweep_overhead.py). Local disks only, as SQLite itself requires."""
    import sqlite3

    db = sqlite_file(url)
    if db is None:
        return
    con = sqlite3.connect(db, timeout=30)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def default_storage(root: Path) -> str:
    return os.environ.get("DYNASTUDY_STORAGE") or f"sqlite:///{root / 'optuna.db'}"
