"""Which database errors are retried: the driver's error class and code decide (SQLSTATE, SQLite result code),
not the words of its message. Real driver exceptions, wrapped by SQLAlchemy as it does itself."""

from __future__ import annotations

import sqlite3
import sys

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from yoloprune.errors import StorageError
from yoloprune.storage import retry
from yoloprune.storage.retry import is_transient, retry_transient


def _wrapped(orig: BaseException, base: type[Exception], *, invalidated: bool = False) -> BaseException:
    """``orig`` as SQLAlchemy raises it: the DBAPIError subclass named like the driver's class, caused by it."""
    wrapped = DBAPIError.instance("SELECT 1", {}, orig, base, connection_invalidated=invalidated)
    wrapped.__cause__ = orig
    return wrapped


@pytest.mark.parametrize(
    ("name", "sqlstate"),
    [
        ("AdminShutdown", "57P01"),  # the server is shutting down (a restart)
        ("CrashShutdown", "57P02"),
        ("CannotConnectNow", "57P03"),  # the server is starting up
        ("IdleSessionTimeout", "57P05"),
        ("ConnectionFailure", "08006"),  # class 08, connection exception
        ("SqlclientUnableToEstablishSqlconnection", "08001"),
        ("TooManyConnections", "53300"),
    ],
)
def test_postgresql_connection_and_shutdown_errors_are_transient(name, sqlstate):
    psycopg = pytest.importorskip("psycopg")
    orig = getattr(psycopg.errors, name)("no words of the message matter")
    assert orig.sqlstate == sqlstate and isinstance(orig, psycopg.OperationalError)
    error = _wrapped(orig, psycopg.Error)
    assert isinstance(error, OperationalError) and is_transient(error)
    chained = StorageError("storage error")
    chained.__cause__ = error  # as Store.session raises it
    assert is_transient(chained)


def test_libpq_failures_without_a_sqlstate_are_transient():
    """Connection refused, lost or timed out: libpq fails before any server answers, so there is no SQLSTATE."""
    psycopg = pytest.importorskip("psycopg")
    for orig in (psycopg.OperationalError("connection failed"), psycopg.errors.ConnectionTimeout("expired")):
        assert orig.sqlstate is None and is_transient(_wrapped(orig, psycopg.Error))


@pytest.mark.parametrize(
    "name",
    ["UndefinedTable", "UniqueViolation", "DatabaseDropped", "QueryCanceled", "DiskFull", "SyntaxError"],
)
def test_other_postgresql_errors_are_not_transient_whatever_their_message(name):
    psycopg = pytest.importorskip("psycopg")
    orig = getattr(psycopg.errors, name)("server closed the connection: connection refused, timed out")
    assert not is_transient(_wrapped(orig, psycopg.Error))
    assert is_transient(_wrapped(orig, psycopg.Error, invalidated=True))  # SQLAlchemy saw the connection die


def test_a_real_sqlite_lock_is_transient_and_a_missing_table_is_not(tmp_path):
    path = tmp_path / "db.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})  # no busy wait: fail at once
    try:
        with pytest.raises(OperationalError) as missing, engine.connect() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))
        assert not is_transient(missing.value)
        holder.execute("BEGIN EXCLUSIVE")  # another process writes
        with pytest.raises(OperationalError) as locked, engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
        assert isinstance(locked.value.orig, sqlite3.OperationalError) and is_transient(locked.value)
        if sys.version_info >= (3, 11):
            assert locked.value.orig.sqlite_errorcode == sqlite3.SQLITE_BUSY
            assert missing.value.orig.sqlite_errorcode == sqlite3.SQLITE_ERROR
    finally:
        holder.close()
        engine.dispose()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3 errors carry their result code from Python 3.11")
def test_sqlite_errors_are_judged_by_result_code_not_message():
    def error(message: str, code: int) -> sqlite3.OperationalError:
        e = sqlite3.OperationalError(message)
        e.sqlite_errorcode = code
        return e

    assert is_transient(_wrapped(error("anything", sqlite3.SQLITE_LOCKED), sqlite3.Error))
    assert is_transient(_wrapped(error("anything", 517), sqlite3.Error))  # SQLITE_BUSY_SNAPSHOT: extended BUSY
    assert not is_transient(_wrapped(error("database is locked; timed out", sqlite3.SQLITE_IOERR), sqlite3.Error))
    assert not is_transient(_wrapped(error("connection refused", sqlite3.SQLITE_CANTOPEN), sqlite3.Error))


def test_errors_of_no_database_driver_are_not_transient():
    assert not is_transient(None)
    assert not is_transient(ValueError("connection refused"))
    assert not is_transient(TimeoutError("timed out"))
    assert not is_transient(StorageError("storage error: the database is locked"))  # no driver error behind it


def test_retry_transient_retries_a_lock_and_raises_a_missing_table_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(retry, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    path = tmp_path / "db.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    calls = []

    @retry_transient
    def insert(sql: str) -> int:
        calls.append(sql)
        if len(calls) == 3:
            holder.execute("COMMIT")  # the other writer finishes
        with engine.begin() as conn:
            conn.execute(text(sql))
        return len(calls)

    try:
        assert insert("INSERT INTO t VALUES (1)") == 3  # two locked attempts, then the write goes through
        calls.clear()
        with pytest.raises(OperationalError, match="no such table"):
            insert("INSERT INTO no_such_table VALUES (1)")
        assert len(calls) == 1
    finally:
        holder.close()
        engine.dispose()


# --- which failures stop the search, and which fail one trial -------------------------------------------


@pytest.mark.parametrize(("name", "sqlstate"), [("SerializationFailure", "40001"), ("DeadlockDetected", "40P01")])
def test_a_transaction_rolled_back_for_a_conflict_is_retried_but_stops_nothing(name, sqlstate):
    from yoloprune.search.trial import storage_failed

    psycopg = pytest.importorskip("psycopg")
    orig = getattr(psycopg.errors, name)("could not serialize access")
    assert orig.sqlstate == sqlstate
    error = _wrapped(orig, psycopg.Error)
    assert is_transient(error) and not storage_failed(error)


@pytest.mark.parametrize(
    ("name", "stops"),
    [
        ("AdminShutdown", True),  # connection-class: past the retries, the server is gone
        ("ConnectionFailure", True),
        ("DiskFull", True),  # 53100: no write can succeed
        ("DatabaseDropped", True),
        ("QueryCanceled", False),  # 57014, a statement timeout: this trial's query only
        ("DeadlockDetected", False),
        ("SerializationFailure", False),
        ("UndefinedTable", False),
        ("UniqueViolation", False),
    ],
)
def test_only_a_lost_connection_a_full_disk_or_a_dropped_database_stops_the_search(name, stops):
    from yoloprune.search.trial import database_error, storage_failed

    psycopg = pytest.importorskip("psycopg")
    error = _wrapped(getattr(psycopg.errors, name)("whatever it says"), psycopg.Error)
    assert storage_failed(error) is stops
    chained = StorageError("storage error")
    chained.__cause__ = error  # as Store.session raises it
    assert storage_failed(chained) is stops
    assert database_error(chained) and database_error(error) is isinstance(error, OperationalError)


def test_libpq_failures_stop_the_search_once_retries_are_spent():
    from yoloprune.search.trial import storage_failed

    psycopg = pytest.importorskip("psycopg")
    assert storage_failed(_wrapped(psycopg.OperationalError("connection failed"), psycopg.Error))


def test_a_busy_sqlite_file_past_its_retries_fails_the_trial_only(tmp_path):
    from yoloprune.search.trial import storage_failed

    path = tmp_path / "db.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with pytest.raises(OperationalError) as locked, engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
        assert is_transient(locked.value) and not storage_failed(locked.value)
    finally:
        holder.close()
        engine.dispose()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3 errors carry their result code from Python 3.11")
def test_a_gone_or_full_sqlite_database_stops_the_search(tmp_path):
    from yoloprune.search.trial import storage_failed

    folder = tmp_path / "db"
    folder.mkdir()
    engine = create_engine(f"sqlite:///{folder / 'study.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
        engine.dispose()
        (folder / "study.db").unlink()
        folder.rmdir()  # the folder removed: SQLite cannot open the file any more
        with pytest.raises(OperationalError) as gone, engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
        assert gone.value.orig.sqlite_errorcode & 0xFF == sqlite3.SQLITE_CANTOPEN and storage_failed(gone.value)
    finally:
        engine.dispose()
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    assert storage_failed(_wrapped(full, sqlite3.Error)) and not is_transient(_wrapped(full, sqlite3.Error))


def test_an_interrupt_in_a_retry_pause_stays_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM while retry_transient waits after a busy file: the KeyboardInterrupt carries the
    OperationalError as its __context__, and the search's database watch must let it through as the interrupt."""
    from types import SimpleNamespace

    from yoloprune.search.database_watch import DatabaseWatch
    from yoloprune.search.trial import storage_failed

    def interrupted_pause(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(retry, "time", SimpleNamespace(sleep=interrupted_pause))
    path = tmp_path / "db.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})

    @retry_transient
    def insert() -> None:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))

    config = SimpleNamespace(storage_url=f"sqlite:///{path}", output_dir=tmp_path)
    try:
        with pytest.raises(KeyboardInterrupt) as interrupt, DatabaseWatch(config):  # type: ignore[arg-type]
            insert()
        assert isinstance(interrupt.value.__context__, OperationalError)
        assert not storage_failed(interrupt.value)
    finally:
        holder.close()
        engine.dispose()
