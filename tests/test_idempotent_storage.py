"""Retried writes never write twice: a commit that reaches the database and whose acknowledgement is then lost
(the connection drops in between) is retried, and the retry finds the row instead of adding a second one.

The loss is injected where it happens: the driver's commit runs, then the driver raises the error a dropped
connection or a busy SQLite file raises (its own class and code, which the retry logic recognises).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from yoloprune.errors import StorageError
from yoloprune.storage import Store, retry
from yoloprune.storage.db import normalize_url
from yoloprune.storage.optuna_adapter import enqueue, fail_trial, new_trial, rdb_storage
from yoloprune.storage.optuna_storage import CREATE_KEY
from yoloprune.storage.record import TrialRecord


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    return request.getfixturevalue("postgres").create_database(f"i_{tmp_path.name[-20:].lower().replace('-', '_')}")


@pytest.fixture(autouse=True)
def no_waits(monkeypatch):
    """Retries without their backoff (ours, and Optuna's own random pause between its attempts)."""
    monkeypatch.setattr(retry, "RETRY_DELAYS_S", (0.0,) * 6)
    monkeypatch.setattr("optuna.storages._rdb.storage.random.random", lambda: 0.0)


@dataclass
class Losses:
    left: int
    lost: int = 0


def _lost_acknowledgement(dialect: str) -> Exception:
    """What the driver raises when the connection drops, or (SQLite) the file is busy, at commit."""
    if dialect == "postgresql":
        import psycopg

        return psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
    error = sqlite3.OperationalError("database is locked")
    error.sqlite_errorcode = sqlite3.SQLITE_BUSY  # what Python >= 3.11 sets; 3.10 reads the words
    return error


@contextmanager
def lost_acknowledgements(engine: Engine, times: int = 1) -> Iterator[Losses]:
    """The next ``times`` commits on ``engine`` are made, then fail as if their acknowledgement had been lost."""
    dialect = engine.dialect
    commit = dialect.do_commit
    losses = Losses(times)

    def do_commit(dbapi_connection):
        commit(dbapi_connection)
        if losses.left > 0:
            losses.left -= 1
            losses.lost += 1
            raise _lost_acknowledgement(dialect.name)

    dialect.do_commit = do_commit  # this engine's dialect only
    try:
        yield losses
    finally:
        del dialect.do_commit


def _rows(url: str, sql: str) -> list[tuple]:
    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


# --- Optuna's trials ------------------------------------------------------------------------------------


@pytest.mark.parametrize("times", [1, 6])  # 6: past Optuna's own 5 attempts, into ours
def test_a_new_trial_is_created_once_when_its_commit_is_not_acknowledged(url, times):
    storage = rdb_storage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    with lost_acknowledgements(storage.engine, times) as losses:
        trial = new_trial(study)
    assert losses.lost == times
    assert _rows(url, "SELECT trial_id, number, state FROM trials") == [(trial._trial_id, 0, "RUNNING")]
    assert _rows(url, "SELECT key FROM trial_system_attributes") == []  # the key is gone once the trial exists
    study.tell(trial, 0.5)
    [stored] = optuna.load_study(study_name="s", storage=normalize_url(url)).trials
    assert (stored.number, stored.state, stored.value, stored.system_attrs) == (0, optuna.trial.TrialState.COMPLETE,
                                                                               0.5, {})  # fmt: skip
    assert new_trial(study).number == 1  # numbering goes on


def test_an_enqueued_trial_is_queued_once_when_its_commit_is_not_acknowledged(url):
    storage = rdb_storage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    with lost_acknowledgements(storage.engine) as losses:
        enqueue(study, {"x": 0.25}, TrialRecord(retry_of=3))
    assert losses.lost == 1
    [queued] = study.get_trials(deepcopy=False)
    assert queued.state == optuna.trial.TrialState.WAITING and queued.user_attrs == {"retry_of": 3}
    assert queued.system_attrs == {"fixed_params": {"x": 0.25}} and CREATE_KEY not in queued.system_attrs
    assert len(_rows(url, "SELECT trial_id FROM trials")) == 1
    trial = study.ask()  # the queued trial is popped, with its parameters
    assert trial.number == 0 and trial.suggest_float("x", 0, 1) == 0.25


def test_finishing_a_trial_whose_commit_is_not_acknowledged_succeeds(url):
    """A repeat would find the trial finished (UpdateFinishedTrialError): the retry sees its own write instead."""
    storage = rdb_storage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = new_trial(study)
    with lost_acknowledgements(storage.engine) as losses:
        assert storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.COMPLETE, [0.5]) is True
    assert losses.lost == 1
    stored = storage.get_trial(trial._trial_id)
    assert stored.state == optuna.trial.TrialState.COMPLETE and stored.values == [0.5]
    # A trial another worker finished differently is still refused.
    other = new_trial(study)
    assert fail_trial(study, other, "stale") is True
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(other._trial_id, optuna.trial.TrialState.COMPLETE, [0.5])


# --- yoloprune's tables ---------------------------------------------------------------------------------


def test_an_artifact_is_recorded_once_when_its_commit_is_not_acknowledged(url, tmp_path):
    store = Store(url)
    exp = store.experiment_id("exp", {})
    f = tmp_path / "w.pt"
    f.write_bytes(b"weights")
    with lost_acknowledgements(store.engine) as losses:
        store.add_artifact(exp, "proxy_checkpoint", f, trial_number=3)
    assert losses.lost == 1
    assert [a["bytes"] for a in store.artifacts(exp)] == [7]
    assert len(_rows(url, "SELECT id FROM yp_artifacts")) == 1
    f.write_bytes(b"weights, written again")  # the same file recorded again (a re-export): its row is updated
    store.add_artifact(exp, "proxy_checkpoint", f, trial_number=3)
    assert [a["bytes"] for a in store.artifacts(exp)] == [22]
    store.add_artifact(exp, "proxy_checkpoint", f, trial_number=4)  # another trial, another kind: other rows
    store.add_artifact(exp, "export_checkpoint", f, trial_number=4)
    store.add_artifact(exp, "export_checkpoint", f)
    store.add_artifact(exp, "export_checkpoint", f)
    assert sorted((a["trial"] or -1, a["kind"]) for a in store.artifacts(exp)) == [
        (-1, "export_checkpoint"), (3, "proxy_checkpoint"), (4, "export_checkpoint"), (4, "proxy_checkpoint"),
    ]  # fmt: skip


def test_a_baseline_is_saved_once_when_its_commit_is_not_acknowledged(url):
    store = Store(url)
    exp = store.experiment_id("exp", {})
    with lost_acknowledgements(store.engine) as losses:
        store.save_baseline(exp, "k", {"map50_95": 0.5})  # a repeat would be a duplicate key: not an error here
    assert losses.lost == 1
    assert store.baseline(exp, "k") == {"map50_95": 0.5}
    assert len(_rows(url, "SELECT id FROM yp_baselines")) == 1
    with pytest.raises(StorageError, match="IntegrityError"):  # a real second baseline for the key still is
        store.save_baseline(exp, "k", {"map50_95": 0.6})


def test_a_worker_is_registered_once_when_its_commit_is_not_acknowledged(url):
    store = Store(url)
    exp = store.experiment_id("exp", {})
    with lost_acknowledgements(store.engine) as losses:
        worker = store.register_worker(exp)
    assert losses.lost == 1
    assert [w["id"] for w in store.workers(exp)] == [worker]
    assert store.register_worker(exp) != worker  # a second registration of the same process is its own row


# --- the retry itself -----------------------------------------------------------------------------------


def test_retry_write_looks_for_the_row_only_after_a_failed_attempt():
    def busy() -> Exception:
        e = sqlite3.OperationalError("database is locked")
        e.sqlite_errorcode = sqlite3.SQLITE_BUSY
        return e

    calls: list[str] = []

    def write() -> int:
        calls.append("write")
        if calls.count("write") == 1:
            raise busy()
        return 1

    def written() -> int | None:
        calls.append("written")
        return None

    assert retry.retry_write(write, written) == 1 and calls == ["write", "written", "write"]
    calls.clear()
    assert retry.retry_write(lambda: 2, written) == 2 and calls == []

    def missing_table() -> int:
        calls.append("write")
        raise sqlite3.OperationalError("no such table: t")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        retry.retry_write(missing_table, written)
    assert calls == ["write"]  # not transient: neither looked for nor repeated
