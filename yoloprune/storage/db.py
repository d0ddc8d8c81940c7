"""The project's own tables, beside Optuna's, in the same database (SQLite by default, PostgreSQL too).

Optuna's RDB storage holds studies, trials, parameters, values and per-trial metrics (user attributes).
These tables hold what Optuna does not: experiments, baselines, artifacts with paths and hashes,
latency measurements (a cache keyed by architecture, backend and spec), and the workers of a search.

The schema is versioned (``yp_meta``): a new database is created at the current version; an older one
is refused with the command that upgrades it in place (``yoloprune db upgrade``), never silently changed.
Transient connection errors (a database restart, a dropped connection) are retried with backoff, and every
retried write is safe to repeat: a commit whose acknowledgement was lost is not written a second time (each
write method says why). Named locks (:meth:`Store.lock`) wait a bounded time (:mod:`yoloprune.storage.locks`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from yoloprune.errors import BackendUnavailableError, StorageError
from yoloprune.log import get_logger
from yoloprune.storage.locks import advisory_lock, file_lock, lock_max_wait_from_env, lock_timeout_from_env

# is_transient and retry_transient lived here before storage.retry: still importable from here.
from yoloprune.storage.retry import is_transient, lost_insert_race, retry_transient, retry_write  # noqa: F401

LOGGER = get_logger(__name__)

#: Version of yoloprune's tables. 1: experiments, baselines, artifacts, latency. 2: + yp_meta, yp_workers.
SCHEMA_VERSION = 2


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class ExperimentRow(Base):
    """One search experiment; its Optuna study has the same name."""

    __tablename__ = "yp_experiments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    schema_version: Mapped[int] = mapped_column(Integer, default=SCHEMA_VERSION)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class BaselineRow(Base):
    """The unpruned model's metrics, measured once per experiment and key (model, data, image size)."""

    __tablename__ = "yp_baselines"
    __table_args__ = (UniqueConstraint("experiment_id", "key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("yp_experiments.id"))
    key: Mapped[str] = mapped_column(String(128))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class MetaRow(Base):
    """Key-value facts about the database itself; ``schema_version`` above all."""

    __tablename__ = "yp_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class WorkerRow(Base):
    """A process that runs trials of an experiment (``yoloprune search`` or ``yoloprune worker``)."""

    __tablename__ = "yp_workers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("yp_experiments.id"))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(32), default="running")
    trials: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ArtifactRow(Base):
    """A file a trial or the experiment produced (checkpoint, ONNX, report), with its hash."""

    __tablename__ = "yp_artifacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("yp_experiments.id"))
    trial_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    kind: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


def normalize_url(url: str) -> str:
    """Give a plain ``postgresql://`` URL the psycopg 3 driver (the ``postgres`` extra) unless psycopg2 is there."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            try:
                import psycopg2  # noqa: F401
            except ImportError:
                return "postgresql+psycopg://" + url.removeprefix(prefix)
            return "postgresql://" + url.removeprefix(prefix)
    return url


class LatencyRow(Base):
    """One latency measurement, keyed by architecture signature, backend, spec and machine."""

    __tablename__ = "yp_latency"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


def engine_for(url: str) -> Engine:
    """A SQLAlchemy engine for ``url``, checked by connecting once; clear errors otherwise."""
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise StorageError(
            f"storage URL '{hide_password(url)}' is not a database URL (e.g. sqlite:///study.db, postgresql://u@h/db)."
        ) from e
    if parsed.drivername.startswith("sqlite") and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url, pool_pre_ping=True)
        with engine.connect():
            pass
    except (NoSuchModuleError, ModuleNotFoundError, ImportError) as e:
        raise BackendUnavailableError(
            f"no database driver for '{parsed.drivername}' ({e}). For PostgreSQL: pip install -e '.[postgres]'."
        ) from e
    except SQLAlchemyError as e:
        shown = parsed.render_as_string(hide_password=True)
        detail = str(e).splitlines()[0]
        if "password authentication failed" in detail or "no password supplied" in detail:
            fix = (
                f"The user or password is wrong: give them in the URL (postgresql://USER:PASSWORD@{parsed.host}:"
                f"{parsed.port or 5432}/{parsed.database}) or in ~/.pgpass, and check with "
                f"`psql -h {parsed.host} -p {parsed.port or 5432} -U {parsed.username} {parsed.database}`."
            )
        elif parsed.drivername.startswith("postgresql"):
            fix = (
                f"Is the server running and reachable? Check with `pg_isready -h {parsed.host} -p "
                f"{parsed.port or 5432}`; or leave storage unset to use a SQLite file in the output folder."
            )
        else:
            fix = "Check the path and its permissions, or leave storage unset to use the default SQLite file."
        raise StorageError(f"cannot reach storage '{shown}': {e.__class__.__name__}: {detail}. {fix}") from e
    return engine


def schema_version(engine: Engine) -> int | None:
    """The version of yoloprune's tables in the database; None when it has none yet."""
    tables = set(inspect(engine).get_table_names())
    if "yp_meta" in tables:
        with engine.connect() as conn:
            value = conn.execute(text("SELECT value FROM yp_meta WHERE key = 'schema_version'")).scalar()
        return int(value) if value is not None else 1
    return 1 if "yp_experiments" in tables else None


def _set_version(conn: Connection, version: int) -> None:
    conn.execute(text("DELETE FROM yp_meta WHERE key = 'schema_version'"))
    conn.execute(text("INSERT INTO yp_meta (key, value) VALUES ('schema_version', :v)"), {"v": str(version)})


def _to_v2(conn: Connection) -> None:
    Base.metadata.create_all(conn, tables=[MetaRow.__table__, WorkerRow.__table__])  # type: ignore[list-item]


#: Upgrade steps: the version each one reaches -> what it does.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _to_v2}


def hide_password(url: str) -> str:
    """``url`` as messages and logs show it: its password, if any, as ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL SQLAlchemy reads: hide what sits where a password would
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class Store:
    """Access to yoloprune's tables. One instance per process and storage URL.

    A database without yoloprune's tables gets them at the current schema version; an older version is
    refused with the command that upgrades it (``upgrade=True`` upgrades it, as ``yoloprune db upgrade``).
    ``lock_timeout_s`` bounds a :meth:`lock` wait for a holder that cannot be shown alive (default:
    ``$YOLOPRUNE_LOCK_TIMEOUT_S``, else :data:`~yoloprune.storage.locks.LOCK_TIMEOUT_S`); ``lock_max_wait_s``
    bounds the wait for one that is (``$YOLOPRUNE_LOCK_MAX_WAIT_S``, else
    :data:`~yoloprune.storage.locks.LOCK_MAX_WAIT_S`).

    Every write is retried on transient errors and is safe to repeat after a lost acknowledgement: an update
    sets absolute values, an insert looks first for the row it would add (by a natural or idempotency key).
    """

    def __init__(
        self,
        url: str,
        *,
        upgrade: bool = False,
        lock_timeout_s: float | None = None,
        lock_max_wait_s: float | None = None,
    ) -> None:
        self.url = url
        #: How long :meth:`lock` waits for a holder not shown alive (None: ``$YOLOPRUNE_LOCK_TIMEOUT_S``, else 30 min).
        self.lock_timeout_s = lock_timeout_from_env() if lock_timeout_s is None else lock_timeout_s
        #: How long :meth:`lock` waits for a holder that is alive (None: ``$YOLOPRUNE_LOCK_MAX_WAIT_S``, else 24 h).
        self.lock_max_wait_s = lock_max_wait_from_env() if lock_max_wait_s is None else lock_max_wait_s
        self.engine = engine_for(url)
        try:
            self._check_schema(upgrade)
        except SQLAlchemyError as e:
            raise StorageError(f"cannot create or check yoloprune's tables in '{hide_password(url)}': {e}") from e
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _check_schema(self, upgrade: bool) -> None:
        if schema_version(self.engine) == SCHEMA_VERSION:
            return
        with self.lock("yoloprune-schema"):  # workers started together: one creates or upgrades, the rest wait
            self._create_or_upgrade(upgrade)

    def _create_or_upgrade(self, upgrade: bool) -> None:
        found = schema_version(self.engine)
        if found is None:
            with self.engine.begin() as conn:
                Base.metadata.create_all(conn)
                _set_version(conn, SCHEMA_VERSION)
            return
        if found > SCHEMA_VERSION:
            raise StorageError(
                f"'{hide_password(self.url)}' holds yoloprune tables of schema version {found}, newer than this "
                f"yoloprune's ({SCHEMA_VERSION}). Upgrade yoloprune (pip install -U yoloprune) on this machine."
            )
        if found == SCHEMA_VERSION:
            return
        if not upgrade:
            shown = hide_password(self.url)
            password = (
                " (the password for ***, or the URL in $YOLOPRUNE_STORAGE and no --storage)" if "***" in shown else ""
            )
            raise StorageError(
                f"'{shown}' holds yoloprune tables of schema version {found}; this yoloprune needs version "
                f"{SCHEMA_VERSION}. Upgrade the database in place (every record is kept): "
                f"yoloprune db upgrade --storage '{shown}'{password}."
            )
        with self.engine.begin() as conn:
            for version in range(found + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[version](conn)
                LOGGER.info("upgraded yoloprune's tables in %s to schema version %d", hide_password(self.url), version)
            _set_version(conn, SCHEMA_VERSION)

    @contextmanager
    def lock(self, name: str, *, timeout_s: float | None = None) -> Iterator[None]:
        """Hold a lock named ``name`` across processes and machines sharing this database.

        PostgreSQL: a session-level advisory lock. SQLite (one machine): a lock file beside the database.
        Waits while the holder is alive (up to :attr:`lock_max_wait_s`), or ``timeout_s`` (default
        :attr:`lock_timeout_s`) when it cannot be shown alive, then raises a StorageError naming the process
        that holds it (host, pid, since when) and how to free it (:mod:`yoloprune.storage.locks`).
        """
        timeout = self.lock_timeout_s if timeout_s is None else timeout_s
        database = self.engine.url.database
        if self.engine.dialect.name == "postgresql":
            with advisory_lock(self.engine, name, timeout, self.lock_max_wait_s):
                yield
        elif self.engine.dialect.name == "sqlite" and database not in (None, "", ":memory:"):
            with file_lock(database, name, timeout, self.lock_max_wait_s):
                yield
        else:  # an in-memory database belongs to this process alone
            yield

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error; driver errors become StorageError."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as e:
            session.rollback()
            raise StorageError(f"storage error: {e.__class__.__name__}: {str(e).splitlines()[0]}") from e
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @retry_transient
    def experiment_id(self, name: str, config: dict[str, Any]) -> int:
        """Id of experiment ``name``, created if new; its stored config is updated to ``config``.

        Workers started together race to create the row; the loser reads the winner's. Safe to repeat: the row
        is looked up by its unique name before it is inserted, and the config is set, not appended.
        """
        try:
            return self._experiment_id(name, config)
        except StorageError as e:
            if not lost_insert_race(e):
                raise
            return self._experiment_id(name, config)

    def _experiment_id(self, name: str, config: dict[str, Any]) -> int:
        with self.session() as s:
            row = s.scalar(select(ExperimentRow).where(ExperimentRow.name == name))
            if row is None:
                row = ExperimentRow(name=name, config=config, schema_version=SCHEMA_VERSION)
                s.add(row)
            else:
                row.config = config
            s.flush()
            return row.id

    @retry_transient
    def find_experiment(self, name: str) -> int | None:
        with self.session() as s:
            row = s.scalar(select(ExperimentRow).where(ExperimentRow.name == name))
            return None if row is None else row.id

    @retry_transient
    def baseline(self, experiment_id: int, key: str) -> dict[str, Any] | None:
        return self._baseline(experiment_id, key)

    def baseline_of(self, name: str) -> dict[str, Any] | None:
        """The latest baseline stored for experiment ``name`` (None: no such experiment, or no baseline yet)."""
        experiment_id = self.find_experiment(name)
        return None if experiment_id is None else self.latest_baseline(experiment_id)

    @retry_transient
    def latest_baseline(self, experiment_id: int) -> dict[str, Any] | None:
        with self.session() as s:
            row = s.scalar(
                select(BaselineRow).where(BaselineRow.experiment_id == experiment_id).order_by(BaselineRow.id.desc())
            )
            return None if row is None else dict(row.metrics)

    def save_baseline(self, experiment_id: int, key: str, metrics: dict[str, Any]) -> None:
        """Store the baseline of ``key``; a second, different one for the same key is an IntegrityError.

        Retried idempotently: after a lost acknowledgement, a stored baseline equal to ``metrics`` is this call's.
        """
        stored = json.loads(json.dumps(metrics))

        def write() -> bool:
            with self.session() as s:
                s.add(BaselineRow(experiment_id=experiment_id, key=key, metrics=stored))
            return True

        retry_write(write, lambda: True if self._baseline(experiment_id, key) == stored else None)

    def _baseline(self, experiment_id: int, key: str) -> dict[str, Any] | None:
        with self.session() as s:
            row = s.scalar(
                select(BaselineRow).where(BaselineRow.experiment_id == experiment_id, BaselineRow.key == key)
            )
            return None if row is None else dict(row.metrics)

    @retry_transient
    def add_artifact(self, experiment_id: int, kind: str, path: Path, trial_number: int | None = None) -> None:
        """Record a file with its SHA-256 and size: one row per experiment, kind, trial and path.

        Safe to repeat: in one transaction, the row of that natural key is looked up and updated (a file
        written again at the same path, e.g. a re-export) or, when there is none, inserted. A retry after a lost
        acknowledgement finds the row its first attempt committed. (Nothing else writes the same key at once: a
        trial's files are recorded by the one worker that runs it.)
        """
        path = Path(path)
        resolved, sha256, size = str(path.resolve()), file_sha256(path), path.stat().st_size
        with self.session() as s:
            row = s.scalars(
                select(ArtifactRow)
                .where(
                    ArtifactRow.experiment_id == experiment_id,
                    ArtifactRow.kind == kind,
                    ArtifactRow.path == resolved,
                    ArtifactRow.trial_number.is_(None)
                    if trial_number is None
                    else ArtifactRow.trial_number == trial_number,
                )
                .order_by(ArtifactRow.id)
            ).first()
            if row is None:
                s.add(
                    ArtifactRow(experiment_id=experiment_id, trial_number=trial_number, kind=kind, path=resolved,
                                sha256=sha256, size_bytes=size)
                )  # fmt: skip
            else:
                row.sha256, row.size_bytes, row.created_at = sha256, size, _now()

    @retry_transient
    def artifacts(self, experiment_id: int) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.scalars(select(ArtifactRow).where(ArtifactRow.experiment_id == experiment_id)).all()
            return [
                {"trial": r.trial_number, "kind": r.kind, "path": r.path, "sha256": r.sha256, "bytes": r.size_bytes}
                for r in rows
            ]

    @retry_transient
    def latency(self, key: str) -> dict[str, Any] | None:
        """A cached latency measurement, or None."""
        with self.session() as s:
            row = s.scalar(select(LatencyRow).where(LatencyRow.key == key))
            return None if row is None else dict(row.result)

    @retry_transient
    def save_latency(self, key: str, result: dict[str, Any]) -> None:
        """Cache a latency measurement, unless one is cached for ``key`` already (the first one is kept).

        Safe to repeat: check-then-insert on the unique key, and a lost insert race keeps the other's row.
        """
        try:
            with self.session() as s:
                if s.scalar(select(LatencyRow).where(LatencyRow.key == key)) is None:
                    s.add(LatencyRow(key=key, result=json.loads(json.dumps(result))))
        except StorageError as e:
            if not lost_insert_race(e):  # another worker measured the same architecture first: keep theirs
                raise

    def register_worker(self, experiment_id: int) -> int:
        """Record this process as a worker of the experiment; returns its id (unique in the database).

        Retried idempotently: the row's host, pid and start time (taken once, before the first attempt) find the
        row an attempt committed before its acknowledgement was lost.
        """
        host, pid, started = socket.gethostname(), os.getpid(), _now()

        def write() -> int:
            with self.session() as s:
                row = WorkerRow(experiment_id=experiment_id, host=host, pid=pid, started_at=started, last_seen=started)
                s.add(row)
                s.flush()
                return row.id

        def written() -> int | None:
            with self.session() as s:
                return s.scalar(
                    select(WorkerRow.id).where(
                        WorkerRow.experiment_id == experiment_id,
                        WorkerRow.host == host,
                        WorkerRow.pid == pid,
                        WorkerRow.started_at == started,
                    )
                )

        return retry_write(write, written)

    @retry_transient
    def update_worker(self, worker_id: int, *, trials: int | None = None, state: str | None = None) -> None:
        """Note that the worker is alive, with its trial count and state. Safe to repeat: it sets values."""
        with self.session() as s:
            row = s.get(WorkerRow, worker_id)
            if row is None:
                return
            row.last_seen = _now()
            if trials is not None:
                row.trials = trials
            if state is not None:
                row.state = state

    @retry_transient
    def workers(self, experiment_id: int) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.scalars(select(WorkerRow).where(WorkerRow.experiment_id == experiment_id).order_by(WorkerRow.id))
            return [
                {"id": r.id, "host": r.host, "pid": r.pid, "state": r.state, "trials": r.trials,
                 "started_at": r.started_at, "last_seen": r.last_seen}
                for r in rows
            ]  # fmt: skip


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
