"""MirroredStorage (study/storage.py): the study in the database equals the one the sampler saw, through
pickling, reloading, a foreign writer and a failing database."""

from __future__ import annotations

import logging
import pickle
import sqlite3

import optuna
import pytest

from study import storage as storage_lib
from study.storage import MirroredStorage, StorageWriteError, mirrors, study_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
DIRECTIONS = ["maximize", "minimize"]


def _url(tmp_path):
    return f"sqlite:///{tmp_path}/optuna.db"


def _study(storage, seed=0):
    return optuna.create_study(storage=storage, study_name="s", directions=DIRECTIONS, load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=5))


def _ask(study, i):
    t = study.ask()
    t.suggest_categorical("op", ["a", "b", "c"])
    t.suggest_float("lr", 1e-3, 1.0, log=True)
    t.set_user_attr("tune_trial_id", f"t{i}")
    return t


def _drive(study, n, start=0):
    """n trials, two at a time, ending COMPLETE, PRUNED (every 5th) or FAIL (every 7th)."""
    running = []
    for i in range(start, start + n):
        running.append(_ask(study, i))
        if len(running) == 2:
            t = running.pop(0)
            if t.number % 7 == 3:
                t.set_user_attr("fail_reason", "diverged")
                study.tell(t, None, state=optuna.trial.TrialState.FAIL)
            elif t.number % 5 == 4:
                study.tell(t, None, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(t, [t.params["lr"], len(t.params["op"]) + t.number])
    return running


def _record(trials):
    return [(t.number, t.state, t.values, t.params, t.user_attrs, t.distributions) for t in trials]


def _on_disk(url):
    disk = optuna.storages.RDBStorage(url)
    return disk.get_all_trials(disk.get_study_id_from_name("s"))


def test_database_equals_what_the_sampler_saw_and_direct_rdb(tmp_path):
    url = _url(tmp_path)
    mirrored = MirroredStorage(url)
    study = _study(mirrored)
    study.set_user_attr("dynastudy.objectives", ["val_acc", "macs"])
    left = _drive(study, 30)
    mirrored.close()
    seen = study.get_trials(deepcopy=False)
    assert len(seen) == 30 and mirrored.queued > 30 * 5
    assert mirrored.writes < mirrored.queued  # a new trial's writes queued together are one transaction
    assert _record(_on_disk(url)) == _record(seen)
    assert optuna.load_study(study_name="s", storage=url).user_attrs == {"dynastudy.objectives": ["val_acc", "macs"]}
    assert [t.state for t in _on_disk(url)][-1] == optuna.trial.TrialState.RUNNING == left[0]._cached_frozen_trial.state
    # The same seeded sampler straight on the database proposes the same configurations: nothing is lost.
    direct = _study(optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/direct.db"))
    _drive(direct, 30)
    assert [t.params for t in direct.get_trials()] == [t.params for t in seen]


@pytest.mark.parametrize("quiet", [0.0, 60.0])
def test_writes_folded_into_creations_or_not_give_the_same_database(tmp_path, monkeypatch, quiet):
    """The writer folds a new trial's queued writes into its creation (one transaction). With no quiet wait it
    writes what has queued while it wrote the last (one write, or a few); with a long one, everything waits for
    the flush and is folded. Either way the database holds what the sampler saw: numbers, states, values,
    parameters, attributes, start times, an enqueued trial (WAITING, then RUNNING: not folded) and NSGA-II's
    system attributes."""
    monkeypatch.setattr(storage_lib, "QUIET_S", quiet)
    monkeypatch.setattr(storage_lib, "MAX_HOLD_S", quiet)
    url = _url(tmp_path)
    mirrored = MirroredStorage(url)
    study = optuna.create_study(storage=mirrored, study_name="s", directions=DIRECTIONS,
                                sampler=optuna.samplers.NSGAIISampler(seed=0, population_size=4))
    study.enqueue_trial({"op": "b", "lr": 0.01})
    left = _drive(study, 14)
    mirrored.flush()
    seen = study.get_trials(deepcopy=False)
    disk = _on_disk(url)
    assert _record(disk) == _record(seen)
    assert [t.system_attrs for t in disk] == [t.system_attrs for t in seen]
    # the database stamps the start of an enqueued trial itself, when it turns RUNNING
    assert [t.datetime_start for t in disk[1:]] == [t.datetime_start for t in seen[1:]]
    assert all(t.datetime_complete is not None for t in disk if t.state.is_finished())
    assert disk[0].params == {"op": "b", "lr": 0.01} and disk[-1].state == left[0]._cached_frozen_trial.state
    if quiet:  # all in one batch: one transaction per trial, but for the enqueued one's writes once RUNNING
        assert len(seen) < mirrored.writes < mirrored.queued / 3
    mirrored.close()


def test_a_finished_trial_refuses_a_second_tell_at_once(tmp_path):
    mirrored = MirroredStorage(_url(tmp_path))
    study = _study(mirrored)
    t = _ask(study, 0)
    study.tell(t, [0.5, 1.0])
    # Raised by the copy at once (close_unfinished relies on it), not later by the writer.
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        mirrored.set_trial_state_values(t._trial_id, optuna.trial.TrialState.COMPLETE, [0.6, 1.0])
    mirrored.close()
    assert _on_disk(_url(tmp_path))[0].values == [0.5, 1.0]


def test_pickled_searcher_state_keeps_its_trials(tmp_path):
    """Tune pickles the searcher with the study and its asked trials; unpickled, a trial asked before still
    tells the same database trial, and the sampler sees the whole study."""
    url = _url(tmp_path)
    mirrored = MirroredStorage(url)
    study = _study(mirrored)
    running = _drive(study, 12)
    blob = pickle.dumps((study, running))
    mirrored.close()
    # Meanwhile the database gets a trial of another process (it comes after ours in the reloaded copy).
    other = _study(optuna.storages.RDBStorage(url))
    other.tell(_ask(other, 99), [0.1, 1.0])
    study2, (pending,) = pickle.loads(blob)
    assert isinstance(study2._storage, MirroredStorage)
    assert len(study2.get_trials()) == 13
    study2.tell(pending, [0.9, 2.0])
    _drive(study2, 4, start=12)
    study2._storage.close()
    disk = _on_disk(url)
    assert disk[pending.number].values == [0.9, 2.0] and disk[pending.number].user_attrs["tune_trial_id"] == "t11"
    assert _record(disk) == _record(study2.get_trials())


def test_reopened_study_is_loaded_whole(tmp_path):
    url = _url(tmp_path)
    first = MirroredStorage(url)
    _drive(_study(first), 10)
    first.close()
    again = MirroredStorage(url)
    study = _study(again)
    assert _record(study.get_trials()) == _record(_on_disk(url))
    _drive(study, 5, start=10)
    again.close()
    assert [t.number for t in _on_disk(url)] == list(range(15))


def test_a_foreign_writer_is_warned_about_and_both_are_recorded(tmp_path, caplog):
    url = _url(tmp_path)
    mirrored = MirroredStorage(url)
    study = _study(mirrored)
    _drive(study, 4)
    mirrored.flush()
    other = _study(optuna.storages.RDBStorage(url))
    other.tell(_ask(other, 99), [0.1, 1.0])
    with caplog.at_level(logging.WARNING, logger="study.storage"):
        _drive(study, 4, start=4)
        mirrored.close()
    assert "another process adds trials to Optuna study s" in caplog.text
    disk = _on_disk(url)
    assert len(disk) == 9 and sum(t.user_attrs.get("tune_trial_id") == "t99" for t in disk) == 1
    ours = sorted(_record(study.get_trials()), key=lambda r: r[4]["tune_trial_id"])
    assert [r[1:] for r in ours] == [r[1:] for r in sorted(_record(t for t in disk if t.user_attrs[
        "tune_trial_id"] != "t99"), key=lambda r: r[4]["tune_trial_id"])]


def test_a_refused_write_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(storage_lib, "RETRY_S", 0.3)
    url = _url(tmp_path)
    mirrored = MirroredStorage(url)
    study = _study(mirrored)
    _drive(study, 3)
    mirrored.flush()
    con = sqlite3.connect(tmp_path / "optuna.db")
    con.execute("DROP TABLE trial_user_attributes")
    con.close()
    _ask(study, 3)
    with pytest.raises(StorageWriteError, match="a write failed"):
        mirrored.flush()
    with pytest.raises(StorageWriteError, match="an earlier write failed"):
        _ask(study, 4)
    with pytest.raises(StorageWriteError):
        mirrored.close(timeout=1)


def test_only_sqlite_files_are_mirrored(tmp_path):
    assert isinstance(study_storage(_url(tmp_path)), MirroredStorage)
    assert not mirrors("postgresql://u:pw@127.0.0.1:5432/optuna")  # drivers may share a study there
