"""MLflow writes that survive a tracking-server outage: an ordered outbox drained by a background thread.

A trial must keep training while the MLflow server is down, and what it logged meanwhile must arrive once the
server is back. Every write (metrics, params, tags, artifacts, the run's end) is queued as a plain, JSON-able
operation and delivered in order by one thread; an operation that fails because the store is unreachable is
retried (backoff up to `max_backoff_s`) until it goes through, one that the store rejects (a bad value) is
dropped and counted. Nothing blocks the caller except `flush`.

What has not arrived yet can be saved with a checkpoint (`save`) and loaded again (`load`): a trial retried after
its node died, or handed back to the sweep's driver after it ended, delivers it later. Replaying is harmless: a
metric keeps the timestamp it was queued with, and MLflow drops an exact duplicate (key, value, step,
timestamp); params, tags, artifacts and a run's end are idempotent by nature.
"""

from __future__ import annotations

import collections
import json
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

OPS_FILE = "outbox.jsonl"
FILES_DIR = "outbox-files"

# Errors that say the request itself is wrong: retrying cannot help.
_REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE",
             "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED"}


def is_transient(error: BaseException) -> bool:
    """Whether a failed tracking call may go through later: the server or database unreachable, overloaded or
    locked (anything but a rejection of the request itself)."""
    if isinstance(error, MlflowException):
        return error.error_code not in _REJECTED
    return isinstance(error, (OSError, TimeoutError)) or type(error).__module__.startswith(
        ("requests", "urllib3", "sqlalchemy"))


def retry(call: Callable[[], Any], deadline_s: float, what: str, pause_s: float = 1.0,
          on_wait: Callable[[str], None] | None = None) -> Any:
    """`call()` again and again while it fails transiently, for at most `deadline_s` seconds; for the few
    writes whose answer is needed at once (a run's id)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            return call()
        except Exception as e:
            if not is_transient(e) or time.monotonic() + pause_s > end:
                raise
            if on_wait is not None:
                on_wait(f"{what}: tracking store unreachable ({type(e).__name__}); retrying")
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 10.0)


class Outbox:
    """Ordered, retried, non-blocking MLflow writes for one process.

        box = Outbox(client)
        box.metrics(run_id, {"val_acc": 0.5}, step=1)
        ...
        left = box.flush(timeout=30)   # 0: everything arrived
        box.save(checkpoint_dir)       # what did not, kept beside the checkpoint
    """

    def __init__(self, client, max_backoff_s: float = 5.0) -> None:
        self.client = client
        self.max_backoff_s = max_backoff_s
        self._ops: collections.deque[dict] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._detached = False  # deliver what is queued, then end
        self._thread: threading.Thread | None = None
        self._current: list[dict] = []  # the operations being delivered (not in _ops any more, not delivered yet)
        self._last_ts = 0  # ms of the last metrics queued
        self._spool = Path(tempfile.mkdtemp(prefix="dynastudy-outbox-"))  # copies of queued artifact files
        # Removed once a detached outbox has delivered everything, else when the outbox is collected: a trial's
        # actor is killed at the sweep's end, before its last outbox is collected, and left one folder per actor.
        weakref.finalize(self, shutil.rmtree, str(self._spool), True)
        # Counters for the trial's status: how many writes had to wait, for how long, and what was refused.
        self.delivered = 0
        self.delayed = 0  # operations that failed at least once before they went through
        self.longest_wait_s = 0.0
        self.rejected: list[str] = []
        self.last_error = ""

    # ------------------------------------------------------------------ queueing
    def metrics(self, run_id: str, metrics: dict[str, Any], step: int, skip_logged: bool = False) -> None:
        """Queue numeric metrics at `step`. `skip_logged`: leave out a key whose history already reaches `step`
        (an epoch recomputed after a crash, whose first values may have arrived before the crash)."""
        # Strictly increasing timestamps: MLflow ranks two values of a key at one step by timestamp (then by value),
        # so a later write (a trial's final val_acc after its last epoch's) must carry a later one.
        with self._cond:
            ts = self._last_ts = max(int(time.time() * 1000), self._last_ts + 1)
        items = [[k, float(v), ts, int(step)] for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if items:
            self._put({"op": "metrics", "run": run_id, "items": items, "skip_logged": skip_logged})

    def params(self, run_id: str, params: dict[str, str]) -> None:
        self._put({"op": "params", "run": run_id, "items": {k: str(v) for k, v in params.items()}})

    def tag(self, run_id: str, key: str, value: str) -> None:
        self._put({"op": "tag", "run": run_id, "key": key, "value": str(value)})

    def delete_tag(self, run_id: str, key: str) -> None:
        self._put({"op": "delete_tag", "run": run_id, "key": key})

    def scratch(self) -> Path:
        """A new folder of this outbox's own for files to hand over with `artifact(..., take=True)`: they are then
        not copied, and each goes once it has arrived."""
        return Path(tempfile.mkdtemp(dir=self._spool))

    def artifact(self, run_id: str, path: Path, take: bool = False) -> None:
        """Queue a file as an artifact of the run: copied now (the caller may delete its own), or with `take`
        a file in a `scratch()` folder, taken as it is."""
        path = Path(path)
        if take:
            if path.parent.parent != self._spool:
                raise ValueError(f"{path} is not in a scratch() folder of this outbox")
            self._put({"op": "artifact", "run": run_id, "file": str(path)})
            return
        folder = self.scratch()
        shutil.copy2(path, folder / path.name)
        self._put({"op": "artifact", "run": run_id, "file": str(folder / path.name)})

    def status(self, run_id: str, status: str, only_if_running: bool = False,
               tags: dict[str, str] | None = None) -> None:
        """Queue the run's status: RUNNING again, or its end (FINISHED, FAILED, KILLED), with `tags` set first.
        `only_if_running`: leave a run that has ended meanwhile as it is, tags included (the driver closing a
        trial Tune stopped or lost)."""
        self._put({"op": "status", "run": run_id, "status": status, "only_if_running": only_if_running,
                   "tags": {k: str(v) for k, v in (tags or {}).items()},
                   "end_time": None if status == "RUNNING" else int(time.time() * 1000)})

    def extend(self, ops: list[dict]) -> None:
        for op in ops:
            self._put(op)

    def _put(self, op: dict) -> None:
        with self._cond:
            if self._closed or self._detached:
                raise RuntimeError("the outbox is closed")
            self._ops.append(op)
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="dynastudy-outbox", daemon=True)
                self._thread.start()

    # ------------------------------------------------------------------ state
    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._ops) + len(self._current)

    def flush(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for everything queued to arrive; returns how many operations have not."""
        end = time.monotonic() + timeout
        with self._cond:
            while (self._ops or self._current) and self._thread is not None:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            return len(self._ops) + len(self._current)

    def close(self, timeout: float = 30.0) -> int:
        """Stop delivering (after the operation in flight, waiting at most `timeout` s); returns what is left.
        What is left stays queued for `save`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        return self.pending

    def detach(self) -> None:
        """Deliver what is queued in the background, then let the thread end (no more writes after this)."""
        with self._cond:
            self._detached = True
            self._cond.notify_all()

    def snapshot(self) -> list[dict]:
        """The operations not delivered yet, in order (those in flight included)."""
        with self._cond:
            return [dict(op) for op in [*self._current, *self._ops]]

    def save(self, folder: Path) -> int:
        """Write what has not arrived into `folder` (a checkpoint's): `outbox.jsonl`, and the artifact files it
        names under `outbox-files/`. Returns how many operations."""
        ops = self.snapshot()
        if not ops:
            return 0
        files = Path(folder) / FILES_DIR
        lines = []
        for i, op in enumerate(ops):
            if op["op"] == "artifact":
                dest = files / str(i) / Path(op["file"]).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copy2(op["file"], dest)
                except FileNotFoundError:  # it was in flight and has arrived meanwhile (its copy is gone)
                    continue
                op = {**op, "file": f"{FILES_DIR}/{i}/{dest.name}"}
            lines.append(json.dumps(op))
        if lines:
            (Path(folder) / OPS_FILE).write_text("\n".join(lines) + "\n")
        return len(lines)

    @staticmethod
    def load(folder: Path) -> list[dict]:
        """The operations `save` wrote into `folder` (artifact paths made absolute); [] when there are none."""
        path = Path(folder) / OPS_FILE
        if not path.is_file():
            return []
        ops = []
        for line in path.read_text().splitlines():
            if line.strip():
                op = json.loads(line)
                if op["op"] == "artifact":
                    op["file"] = str(Path(folder) / op["file"])
                ops.append(op)
        return ops

    def adopt(self, folder: Path) -> int:
        """Queue what a checkpoint folder holds (its artifact files copied into this outbox's spool first, since
        the folder may go away). Returns how many operations."""
        ops = self.load(folder)
        for op in ops:
            if op["op"] == "artifact":
                dest = Path(tempfile.mkdtemp(dir=self._spool)) / Path(op["file"]).name
                shutil.copy2(op["file"], dest)
                op["file"] = str(dest)
        self.extend(ops)
        return len(ops)

    def summary(self) -> str:
        """One line on what had to wait or was refused ('' when everything went straight through)."""
        parts = []
        if self.delayed:
            parts.append(f"{self.delayed} MLflow writes waited up to {self.longest_wait_s:.0f} s for the tracking "
                         "server")
        if self.rejected:
            parts.append(f"{len(self.rejected)} refused by it ({self.rejected[0]})")
        if self.pending:
            parts.append(f"{self.pending} not delivered by the trial ({self.last_error})")
        return "; ".join(parts)

    # ------------------------------------------------------------------ delivery
    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._ops and not self._closed and not self._detached:
                    self._cond.wait()
                if self._closed or not self._ops:
                    self._cond.notify_all()
                    if not self._closed:  # detached, and all went: nothing can use the spool again
                        shutil.rmtree(self._spool, ignore_errors=True)
                    return
                group = self._current = _take_group(self._ops)
            delivered = self._deliver_with_retry(group)
            with self._cond:
                self._current = []
                if not delivered:  # closed while the store was unreachable: keep them for `save`
                    self._ops.extendleft(reversed(group))
                self._cond.notify_all()

    def _deliver_with_retry(self, group: list[dict]) -> bool:
        first_failure = None
        pause = 0.5
        while True:
            try:
                self._deliver_group(group)
                self.delivered += len(group)
                for op in group:
                    if op["op"] == "artifact" and Path(op["file"]).parent.parent == self._spool:
                        _remove(Path(op["file"]))  # our copy (a model may be large)
                if first_failure is not None:
                    self.delayed += len(group)
                    self.longest_wait_s = max(self.longest_wait_s, time.monotonic() - first_failure)
                return True
            except Exception as e:
                if not is_transient(e):
                    if len(group) > 1:  # one of them is refused: deliver them one by one, to lose only that one
                        return all([self._deliver_with_retry([op]) for op in group])
                    op = group[0]
                    self.rejected.append(f"{op['op']} for run {op.get('run', '?')}: {str(e).splitlines()[0][:200]}")
                    return True  # dropped: it can never arrive
                self.last_error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                first_failure = first_failure or time.monotonic()
            with self._cond:
                if self._closed:
                    return False
                self._cond.wait(pause)
                if self._closed:
                    return False
            pause = min(pause * 2, self.max_backoff_s)

    def _deliver_group(self, group: list[dict]) -> None:
        if len(group) == 1:
            return self._deliver(group[0])
        run = group[0]["run"]
        if group[0]["op"] == "artifact":  # the whole scratch folder (`_take_group`): one call, one lookup of the run
            return self.client.log_artifacts(run, str(Path(group[0]["file"]).parent))
        metrics = [Metric(k, v, ts, step) for op in group if op["op"] == "metrics" for k, v, ts, step in op["items"]]
        params = [Param(k, v) for op in group if op["op"] == "params" for k, v in op["items"].items()]
        tags = {op["key"]: RunTag(op["key"], op["value"]) for op in group if op["op"] == "tag"}  # the last one wins
        self.client.log_batch(run, metrics=metrics, params=params, tags=list(tags.values()))

    def _deliver(self, op: dict) -> None:
        c, run, kind = self.client, op.get("run"), op["op"]
        if kind == "metrics":
            items = op["items"]
            if op.get("skip_logged"):
                items = [i for i in items if i[3] > _last_step(c, run, i[0])]
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in items]
            for i in range(0, len(metrics), 1000):
                c.log_batch(run, metrics=metrics[i:i + 1000])
        elif kind == "params":
            params = [Param(k, v) for k, v in op["items"].items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                c.log_batch(run, params=params[i:i + 100])
        elif kind == "tag":
            c.log_batch(run, tags=[RunTag(op["key"], op["value"])])
        elif kind == "delete_tag":
            if op["key"] in c.get_run(run).data.tags:
                c.delete_tag(run, op["key"])
        elif kind == "artifact":
            c.log_artifact(run, op["file"])
        elif kind == "status":
            if op.get("only_if_running") and c.get_run(run).info.status != "RUNNING":
                return
            if op.get("tags"):
                c.log_batch(run, tags=[RunTag(k, v) for k, v in op["tags"].items()])
            if op["status"] == "RUNNING":
                c.update_run(run, status="RUNNING")
            else:
                c.set_terminated(run, op["status"], end_time=op.get("end_time"))
        else:
            raise ValueError(f"unknown outbox operation {kind!r}")


# What one MLflow log_batch takes (its documented limits).
BATCH_METRICS, BATCH_PARAMS, BATCH_TAGS, BATCH_TOTAL = 1000, 100, 100, 1000


def _size(op: dict) -> tuple[int, int, int]:
    kind = op["op"]
    return (len(op["items"]) if kind == "metrics" else 0, len(op["items"]) if kind == "params" else 0,
            1 if kind == "tag" else 0)


def _batchable(op: dict) -> bool:
    return op["op"] in ("params", "tag") or (op["op"] == "metrics" and not op.get("skip_logged"))


def _take_group(ops: collections.deque) -> list[dict]:
    """The next operations to deliver in one call, taken off `ops`: consecutive metrics, params and tags of one
    run as one log_batch, or the files of one scratch folder as one log_artifacts when they are all of it;
    otherwise the first operation alone. Every write to a SQLite store is a transaction of several ms, and a trial
    ends with a few of them queued at once (benchmarks/sweep_overhead.py)."""
    group = [ops.popleft()]
    first = group[0]
    if _batchable(first):
        m, p, t = _size(first)
        while ops and _batchable(ops[0]) and ops[0]["run"] == first["run"]:
            dm, dp, dt = _size(ops[0])
            if m + dm > BATCH_METRICS or p + dp > BATCH_PARAMS or t + dt > BATCH_TAGS or \
                    m + dm + p + dp + t + dt > BATCH_TOTAL:
                break
            m, p, t = m + dm, p + dp, t + dt
            group.append(ops.popleft())
    elif first["op"] == "artifact":
        folder = Path(first["file"]).parent
        k = 0  # how many of the next operations are files of the same folder for the same run
        while k < len(ops) and ops[k]["op"] == "artifact" and ops[k]["run"] == first["run"] and \
                Path(ops[k]["file"]).parent == folder:
            k += 1
        # Only a folder whose files are exactly these (not one with a file queued later, or delivered already).
        names = sorted([Path(first["file"]).name] + [Path(ops[i]["file"]).name for i in range(k)])
        try:
            whole = k > 0 and sorted(p.name for p in folder.iterdir()) == names
        except OSError:
            whole = False
        if whole:
            group += [ops.popleft() for _ in range(k)]
    return group


def _last_step(client, run_id: str, key: str) -> int:
    history = client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)


def _remove(path: Path) -> None:
    """A delivered file of the spool, and its folder once that is empty (a scratch folder holds several)."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass
