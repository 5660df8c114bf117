"""What the dashboard and the static report read from MLflow, and how it is kept cheap while a sweep runs.

`StudyCache` holds, per study, one summary row per trial run (params, final metrics, status, times) and every
frontier point of every finished trial. The first look at a study pages through its runs once; each refresh after
that asks MLflow only for the runs that ended since the last one and for those still running (two small
queries), and downloads the frontier artifact of a newly finished trial once (cached on disk by run id, as
`dynastudy pareto` does: a finished trial's frontier never changes). Metric histories are never read for the
whole study: `load_trial` reads one run's curves and tables when its trial view is opened.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from study import queries
from study.tracking import (COST, FRONTIER, TAG_FAIL, TAG_KIND, TAG_METHOD, TAG_NODE, TAG_NOTES, TAG_PARENT,
                            TAG_TRIAL, Tracker)

# Per-epoch curves a trial view draws (plus val_acc_exit_<k> and val_acc_head_<i> where the run has them).
CURVES = ("train_loss", "val_acc", "lr", "epoch_time_s", "images_per_s")
# Parquet artifacts a trial view can show, by table name.
TABLES = ("frontier", "gate_rates", "heads", "lottery", "lottery_layers", "lesion")
RUN_COLUMNS = ["run_id", "method", "trial", "kind", "status", "start_time", "end_time", "val_acc", "test_acc",
               "macs", "macs_full", "node", "notes", "fail_reason", "parent", "params"]


@dataclasses.dataclass
class TrialData:
    """One trial run as its trial view needs it. `histories` maps a metric key to its (step, value) pairs in step
    order; `tables` maps a table name of TABLES to its DataFrame, present only when the run logged it."""
    run_id: str
    method: str
    trial: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, float]
    tags: dict[str, str]
    histories: dict[str, list[tuple[int, float]]]
    tables: dict[str, pd.DataFrame]
    cost: dict[str, Any] | None  # the cost card (cost.json), where logged

    def exits(self) -> int:
        """How many exits the network has (from its final per-exit metrics)."""
        return sum(1 for k in self.metrics if k.startswith("macs_exit_"))
