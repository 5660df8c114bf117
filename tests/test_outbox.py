"""The outbox (study/outbox.py) against real MLflow stores: a SQLite store, and an HTTP tracking URI where no server
listens (an outage). In seconds; the 30 s outage of a real server during a sweep is tests/test_crashes.py."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from study.localcluster import free_port
from study.outbox import Outbox, is_transient, retry
from study.tracking import Tracker


@pytest.fixture()
def store(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db")
    exp = tracker.ensure_experiment("s", tmp_path / "art")
    return tracker, tracker.client.create_run(exp).info.run_id


@pytest.fixture()
def down(monkeypatch):
    """A client of a tracking server that is not there (connection refused), failing fast."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}")


def test_writes_arrive_in_order_and_replays_add_nothing(store, tmp_path):
    tracker, run = store
    box = Outbox(tracker.client)
    for step in (1, 2, 3):
        box.metrics(run, {"val_acc": step / 10, "flag": True, "name": "x"}, step=step)  # non-numbers left out
    box.params(run, {"lr": 0.1})
    box.tag(run, "k", "v")
    (tmp_path / "a.txt").write_text("hello")
    box.artifact(run, tmp_path / "a.txt")
    (tmp_path / "a.txt").unlink()  # the outbox copied it when it was queued
    box.status(run, "FINISHED")
    assert box.flush(30) == 0 and box.delivered == 7 and not box.summary()
    assert list(box._spool.iterdir()) == []  # its copy of a delivered artifact is gone
    history = tracker.client.get_metric_history(run, "val_acc")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    got = tracker.client.get_run(run)
    assert got.info.status == "FINISHED" and got.data.params == {"lr": "0.1"} and got.data.tags["k"] == "v"
    assert set(got.data.metrics) == {"val_acc"}

    # Two values of a key at one step (an epoch's val_acc, then the trial's final one): the later one is the run's.
    box2 = Outbox(tracker.client)
    box2.metrics(run, {"loss": 0.9}, step=5)
    box2.metrics(run, {"loss": 0.1}, step=5)
    assert box2.flush(30) == 0 and tracker.client.get_run(run).data.metrics["loss"] == 0.1
    assert [a.path for a in tracker.client.list_artifacts(run)] == ["a.txt"]

    # What a checkpoint kept is delivered again after a crash: metrics keep their timestamps, so no duplicate.
    again = Outbox(tracker.client)
    again.metrics(run, {"val_acc": 0.3}, step=3, skip_logged=True)  # an epoch recomputed after a crash
    again.metrics(run, {"val_acc": 0.4}, step=4, skip_logged=True)
    assert again.flush(30) == 0
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run, "val_acc")] == \
        [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]


def test_files_written_into_a_scratch_folder_are_taken_without_a_copy(store, tmp_path):
    tracker, run = store
    box = Outbox(tracker.client)
    folder = box.scratch()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text(name)
        box.artifact(run, folder / name, take=True)
    with pytest.raises(ValueError, match="not in a scratch"):
        box.artifact(run, tmp_path / "elsewhere.txt", take=True)
    assert box.flush(30) == 0
    assert sorted(a.path for a in tracker.client.list_artifacts(run)) == ["a.txt", "b.txt"]
    assert list(box._spool.iterdir()) == []  # each file went once it arrived, then the empty folder


def test_a_detached_outbox_removes_its_spool_once_everything_went(store, tmp_path):
    """A trial's last outbox is detached and its actor killed at the sweep's end, before the outbox is collected:
    its thread removes the spool itself once it has delivered everything."""
    tracker, run = store
    box = Outbox(tracker.client)
    folder = box.scratch()
    (folder / "a.txt").write_text("a")
    box.artifact(run, folder / "a.txt", take=True)
    box.status(run, "FINISHED")
    spool = box._spool
    box.detach()
    box._thread.join(30)
    assert not box._thread.is_alive() and box.pending == 0 and not spool.exists()
    assert [a.path for a in tracker.client.list_artifacts(run)] == ["a.txt"]
    with pytest.raises(RuntimeError, match="closed"):
        box.tag(run, "k", "v")


class CountingClient:
    """A real MLflow client that counts the calls made on it."""

    def __init__(self, client) -> None:
        self.client, self.calls = client, []

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)
        return call


def test_what_is_queued_together_goes_in_as_few_calls_as_the_store_takes(store):
    """A trial's end queues metrics, tags, its files and its status at once: one log_batch, one log_artifacts,
    then the status, with what arrives the same as one call per write."""
    tracker, run = store
    spy = CountingClient(tracker.client)
    box = Outbox(spy)
    with box._cond:  # held: the delivering thread sees everything queued at once, as at a trial's end
        box.metrics(run, {"val_acc": 0.5, "loss": 1.0}, step=1)
        box.metrics(run, {"val_acc": 0.6}, step=1)  # the final value at the same step: the later one is the run's
        box.params(run, {"lr": 0.1, "depth": 20})
        box.tag(run, "k", "first")
        box.tag(run, "k", "second")
        folder = box.scratch()
        for name in ("frontier.parquet", "cost.json"):
            (folder / name).write_text(name)
            box.artifact(run, folder / name, take=True)
        box.status(run, "FINISHED")
        box.params(run, {"after": 1})
    assert box.flush(30) == 0 and box.delivered == 9 and not box.rejected
    assert spy.calls == ["log_batch", "log_artifacts", "set_terminated", "log_batch"]
    got = tracker.client.get_run(run)
    assert got.info.status == "FINISHED" and got.data.tags["k"] == "second"
    assert got.data.params == {"lr": "0.1", "depth": "20", "after": "1"}
    assert got.data.metrics == {"val_acc": 0.6, "loss": 1.0}
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run, "val_acc")] == [(1, 0.5), (1, 0.6)]
    assert sorted(a.path for a in tracker.client.list_artifacts(run)) == ["cost.json", "frontier.parquet"]
    assert list(box._spool.iterdir()) == []

    # A batch the store refuses (a changed param) is delivered one by one: only the bad write is lost.
    spy.calls.clear()
    with box._cond:
        box.metrics(run, {"loss": 0.5}, step=2)
        box.params(run, {"lr": 0.2})
        box.tag(run, "after", "yes")
    assert box.flush(30) == 0 and len(box.rejected) == 1 and "lr" in box.rejected[0]
    assert spy.calls == ["log_batch"] * 4
    got = tracker.client.get_run(run)
    assert got.data.tags["after"] == "yes" and got.data.metrics["loss"] == 0.5 and got.data.params["lr"] == "0.1"

    # Files of a folder that holds more than what is queued go one by one.
    spy.calls.clear()
    folder = box.scratch()
    with box._cond:
        for name in ("a.txt", "b.txt"):
            (folder / name).write_text(name)
        box.artifact(run, folder / "a.txt", take=True)
    assert box.flush(30) == 0 and spy.calls == ["log_artifact"]
    box.artifact(run, folder / "b.txt", take=True)
    assert box.flush(30) == 0 and spy.calls == ["log_artifact"] * 2
    assert {"a.txt", "b.txt"} <= {a.path for a in tracker.client.list_artifacts(run)}


def test_an_outage_never_blocks_and_what_waits_is_saved_then_delivered(store, down, tmp_path):
    tracker, run = store
    box = Outbox(down, max_backoff_s=0.2)
    t0 = time.monotonic()
    box.metrics(run, {"val_acc": 0.5}, step=1)
    box.tag(run, "k", "v")
    (tmp_path / "f.bin").write_bytes(b"\x00\x01")
    box.artifact(run, tmp_path / "f.bin")
    box.status(run, "FINISHED")
    assert time.monotonic() - t0 < 0.5  # queueing does not wait for the server
    assert box.flush(1.0) == 4
    assert box.close(timeout=5) == 4 and "not delivered" in box.summary() and box.last_error
    with pytest.raises(RuntimeError):
        box.tag(run, "late", "x")
    saved = tmp_path / "ckpt"
    saved.mkdir()
    assert box.save(saved) == 4

    # The server back (here: the run's own store): the saved writes arrive, in order.
    later = Outbox(tracker.client)
    assert later.adopt(saved) == 4 and later.flush(30) == 0
    got = tracker.client.get_run(run)
    assert got.info.status == "FINISHED" and got.data.tags["k"] == "v" and got.data.metrics["val_acc"] == 0.5
    assert [a.path for a in tracker.client.list_artifacts(run)] == ["f.bin"]


def test_a_write_the_store_refuses_is_dropped_and_counted(store):
    tracker, run = store
    box = Outbox(tracker.client)
    box.params(run, {"lr": 0.1})
    box.params(run, {"lr": 0.2})  # MLflow refuses to change a param
    box.tag(run, "after", "yes")  # and the writes after it still arrive
    assert box.flush(30) == 0
    assert len(box.rejected) == 1 and "refused" in box.summary()
    assert tracker.client.get_run(run).data.tags["after"] == "yes"


def test_only_what_may_succeed_later_is_retried(down, store):
    tracker, run = store
    with pytest.raises(Exception) as e:
        down.get_run(run)
    assert is_transient(e.value)
    tracker.client.log_param(run, "p", "1")
    with pytest.raises(Exception) as e:
        tracker.client.log_param(run, "p", "2")
    assert not is_transient(e.value)
    t0 = time.monotonic()
    with pytest.raises(Exception):
        retry(lambda: down.get_run(run), deadline_s=1.0, what="reading", pause_s=0.2)
    assert time.monotonic() - t0 < 5
    calls = []
    assert retry(lambda: calls.append(1) or len(calls), deadline_s=1.0, what="x") == 1


def test_what_a_sweep_could_not_deliver_waits_on_disk_for_resume(store, down, tmp_path, capsys):
    """The sweep's end (`runner._deliver`) keeps what the server never took under <results>/undelivered/<sweep run>;
    `dynastudy resume` (`runner.deliver_saved`) sends it once the store answers, then removes it."""
    import io

    from study.runner import SweepSpec, _deliver, deliver_saved

    tracker, run = store
    res = tmp_path / "res"
    spec = SweepSpec(study="s", methods=("elastic",), trials=1, fixed={}, results_dir=res,
                     tracking_uri="http://127.0.0.1:9", storage="sqlite:////x.db", tracking_timeout_s=0.5)
    box = Outbox(down, max_backoff_s=0.2)
    box.metrics(run, {"trials_complete": 1}, step=0)
    box.status(run, "FINISHED")
    assert _deliver(box, spec, run, io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "2 MLflow writes could not reach http://127.0.0.1:9 within 0.5 s" in err and "dynastudy resume" in err
    assert (res / "undelivered" / run / "outbox.jsonl").is_file()

    out = io.StringIO()
    assert deliver_saved(tracker, res, 30, out) == 2 and "delivered 2 MLflow writes" in out.getvalue()
    got = tracker.client.get_run(run)
    assert got.info.status == "FINISHED" and got.data.metrics["trials_complete"] == 1
    assert list((res / "undelivered").iterdir()) == []
