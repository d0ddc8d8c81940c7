"""The search's database failing under it: a SQLite file deleted or its folder removed, a full disk, a server gone.

:class:`DatabaseWatch` wraps the trial loop. It notices a SQLite file deleted or replaced while the search runs
(the open connections would otherwise go on writing into the deleted file, lost when the process exits), keeps a
copy of that file's last state where Linux still lets this process read it, and turns the failure into one
:class:`~yoloprune.errors.StorageError` that says what is kept and how to resume. Background threads' database
errors (Optuna's heartbeats) are logged in one line while it is active, not as tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from yoloprune.atomic import is_disk_full
from yoloprune.config import ExperimentConfig
from yoloprune.errors import StorageError
from yoloprune.log import get_logger
from yoloprune.search.trial import StorageLost, database_error
from yoloprune.storage.db import hide_password

LOGGER = get_logger(__name__)

#: SQLite's primary result code for "database or disk is full".
SQLITE_FULL = 13


class DatabaseWatch:
    """Watches the experiment's database while trials run; see the module docstring."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        url = config.storage_url
        file = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
        self.path = Path(file).resolve() if file not in (None, "", ":memory:") else None
        self.identity = _identity(self.path) if self.path is not None else None
        self._hook: Any = None

    def __enter__(self) -> DatabaseWatch:
        self._hook = threading.excepthook
        threading.excepthook = self._thread_error
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        threading.excepthook = self._hook
        if error is None or isinstance(error, KeyboardInterrupt):  # Ctrl-C or SIGTERM, even in a retry's pause
            return
        if isinstance(error, StorageLost) or database_error(error):  # what escaped Optuna's loop stops the search
            raise self.lost(error) from error

    def check(self) -> None:
        """Raise :class:`StorageLost` when the SQLite file was deleted or replaced since the search started."""
        if self.path is not None and _identity(self.path) != self.identity:
            raise StorageLost(FileNotFoundError(f"{self.path} was deleted or replaced while the search ran"))

    def lost(self, error: BaseException) -> StorageError:
        """The error the user sees: what failed, what is kept, and how to resume."""
        cause = error.cause if isinstance(error, StorageLost) else error
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        checkpoints = self.config.output_dir / "trials"
        kept = (
            f"Kept on disk: the checkpoints of finished trials in {checkpoints} (each holds its candidate and "
            "proxy metrics under 'yoloprune')."
        )
        if self.path is None:
            shown = hide_password(self.config.storage_url)
            return StorageError(
                f"lost the database {shown}: {detail}. The finished trials are kept in it. When it is reachable "
                "again, run the same command to resume: the trial that was running is queued again once its "
                f"heartbeat is older than engine.workers.grace_s ({self.config.engine.workers.grace_s} s)."
            )
        if _identity(self.path) != self.identity:
            return StorageError(self._gone_message(kept))
        if _sqlite_code(cause) == SQLITE_FULL or is_disk_full(cause, self.path.parent):
            free = shutil.disk_usage(self.path.parent).free
            return StorageError(
                f"cannot write the database {self.path}: the file system holding {self.path.parent} is full "
                f"({free / 1e6:.1f} MB free). Free space there (or set `storage:` to a database on a disk with room) "
                "and run the same command again: the finished trials are kept in it and the trial that was running "
                "is queued again."
            )
        return StorageError(
            f"cannot write the database {self.path}: {detail}. Fix the file or its folder and run the same command "
            f"again to resume. {kept}"
        )

    def _gone_message(self, kept: str) -> str:
        path = self.path
        if path is None:
            return kept
        head = f"the database {path} was deleted or replaced while the search ran."
        copy = _rescue(path, self.config.output_dir)
        if copy is None:
            return (
                f"{head} {kept} To resume, restore {path} from a backup and run the same command again; "
                "without one, a new run starts a new study and the trials run again."
            )
        finished = _finished_trials(copy)
        restore = f"mkdir -p '{path.parent}' && mv '{copy}' '{path}'" if not path.parent.exists() else ""
        restore = restore or f"mv '{copy}' '{path}'"
        return (
            f"{head} This process still had it open: its last state (finished trials: {finished}) is saved as {copy}. "
            f"To resume: {restore}, then run the same command again (the trial that was running is queued again). "
            f"{kept}"
        )

    def _thread_error(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and database_error(args.exc_value):
            first = str(args.exc_value).splitlines()[0] if str(args.exc_value) else type(args.exc_value).__name__
            name = getattr(args.thread, "name", "a background thread")
            LOGGER.warning("%s could not write to the database (%s)", name, first)
            return
        self._hook(args)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _sqlite_code(error: BaseException | None) -> int | None:
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) is not None:
            return int(error.sqlite_errorcode) & 0xFF
        error, seen = error.__cause__ or error.__context__ or getattr(error, "orig", None), seen + 1
    return None


def _rescue(path: Path, output: Path) -> Path | None:
    """Copy the deleted SQLite file this process still holds open (Linux: ``/proc/self/fd``) beside it, or into
    ``output`` when its folder is gone; None when there is no such file or no place to put it."""
    fds = Path("/proc/self/fd")
    deleted = f"{path} (deleted)"
    if not fds.is_dir():
        return None
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == deleted:
                for folder in (path.parent, output):
                    copy = folder / f"{path.name}.recovered"
                    with contextlib.suppress(OSError):
                        shutil.copyfile(fd, copy)
                        return copy
    return None


def _finished_trials(path: Path) -> int | str:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()
    except sqlite3.Error:
        return "?"
    return int(row[0])
