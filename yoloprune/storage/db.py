"""The project's own tables, beside Optuna's, in the same database (SQLite by default, PostgreSQL too).

Optuna's RDB storage holds studies, trials, parameters, values and per-trial metrics (user attributes).
These tables hold what Optuna does not: experiments, baselines, artifacts with paths and hashes, and
latency measurements (a cache keyed by architecture, backend and spec).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, UniqueConstraint, create_engine, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from yoloprune.errors import BackendUnavailableError, StorageError

SCHEMA_VERSION = 1


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
            f"storage URL '{url}' is not a database URL (e.g. sqlite:///study.db, postgresql://u@h/db)."
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
        raise StorageError(
            f"cannot reach storage '{parsed.render_as_string(hide_password=True)}': {e.__class__.__name__}: "
            f"{str(e).splitlines()[0]}. Check the host, port, user and password, or leave storage unset to use "
            "a SQLite file in the experiment's output folder."
        ) from e
    return engine


class Store:
    """Access to yoloprune's tables. One instance per process and storage URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = engine_for(url)
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as e:
            raise StorageError(f"cannot create yoloprune's tables in '{url}': {e}") from e
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

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

    def experiment_id(self, name: str, config: dict[str, Any]) -> int:
        """Id of experiment ``name``, created if new; its stored config is updated to ``config``."""
        with self.session() as s:
            row = s.scalar(select(ExperimentRow).where(ExperimentRow.name == name))
            if row is None:
                row = ExperimentRow(name=name, config=config, schema_version=SCHEMA_VERSION)
                s.add(row)
            else:
                row.config = config
            s.flush()
            return row.id

    def find_experiment(self, name: str) -> int | None:
        with self.session() as s:
            row = s.scalar(select(ExperimentRow).where(ExperimentRow.name == name))
            return None if row is None else row.id

    def baseline(self, experiment_id: int, key: str) -> dict[str, Any] | None:
        with self.session() as s:
            row = s.scalar(
                select(BaselineRow).where(BaselineRow.experiment_id == experiment_id, BaselineRow.key == key)
            )
            return None if row is None else dict(row.metrics)

    def latest_baseline(self, experiment_id: int) -> dict[str, Any] | None:
        with self.session() as s:
            row = s.scalar(
                select(BaselineRow).where(BaselineRow.experiment_id == experiment_id).order_by(BaselineRow.id.desc())
            )
            return None if row is None else dict(row.metrics)

    def save_baseline(self, experiment_id: int, key: str, metrics: dict[str, Any]) -> None:
        with self.session() as s:
            s.add(BaselineRow(experiment_id=experiment_id, key=key, metrics=json.loads(json.dumps(metrics))))

    def add_artifact(self, experiment_id: int, kind: str, path: Path, trial_number: int | None = None) -> None:
        """Record a file with its SHA-256 and size."""
        path = Path(path)
        with self.session() as s:
            s.add(
                ArtifactRow(
                    experiment_id=experiment_id,
                    trial_number=trial_number,
                    kind=kind,
                    path=str(path.resolve()),
                    sha256=file_sha256(path),
                    size_bytes=path.stat().st_size,
                )
            )

    def artifacts(self, experiment_id: int) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.scalars(select(ArtifactRow).where(ArtifactRow.experiment_id == experiment_id)).all()
            return [
                {"trial": r.trial_number, "kind": r.kind, "path": r.path, "sha256": r.sha256, "bytes": r.size_bytes}
                for r in rows
            ]

    def latency(self, key: str) -> dict[str, Any] | None:
        """A cached latency measurement, or None."""
        with self.session() as s:
            row = s.scalar(select(LatencyRow).where(LatencyRow.key == key))
            return None if row is None else dict(row.result)

    def save_latency(self, key: str, result: dict[str, Any]) -> None:
        with self.session() as s:
            if s.scalar(select(LatencyRow).where(LatencyRow.key == key)) is None:
                s.add(LatencyRow(key=key, result=json.loads(json.dumps(result))))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
