"""Named locks across the processes and machines that share a database, with a bounded wait.

SQLite (one machine): a lock file beside the database (``flock``, freed by the OS when its holder exits), and a
holder file beside it naming the process that holds it. PostgreSQL: a session-level advisory lock, taken with
``pg_try_advisory_lock`` in a loop; its holder is found in ``pg_locks`` and ``pg_stat_activity``, where the
holding session's ``application_name`` names the process (host, pid, since when).

A wait that passes its timeout raises :class:`~yoloprune.errors.StorageError` naming the holder and what to do.
The default timeout, :data:`LOCK_TIMEOUT_S`, is long because a lock may cover real work (one worker evaluates the
unpruned baseline while the others wait for its result); ``$YOLOPRUNE_LOCK_TIMEOUT_S`` or
``Store(lock_timeout_s=...)`` changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from yoloprune.errors import ConfigError, StorageError
from yoloprune.log import get_logger
from yoloprune.storage.retry import is_transient

LOGGER = get_logger(__name__)

#: How long a lock is waited for by default (seconds): longer than a baseline evaluation on a CPU.
LOCK_TIMEOUT_S = 1800.0

#: The environment variable that overrides :data:`LOCK_TIMEOUT_S` (seconds), read when a Store is opened.
LOCK_TIMEOUT_ENV = "YOLOPRUNE_LOCK_TIMEOUT_S"

#: Longest pause between two tries of a PostgreSQL advisory lock (seconds).
POLL_S = 0.5

#: What a PostgreSQL session holding a lock calls itself (``application_name``, 63 bytes at most).
_TAG = "yoloprune-lock"


def lock_timeout_from_env() -> float:
    """:data:`LOCK_TIMEOUT_S`, or ``$YOLOPRUNE_LOCK_TIMEOUT_S`` where it is set."""
    value = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not value:
        return LOCK_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"${LOCK_TIMEOUT_ENV}={value!r} is not a number of seconds >= 0 (e.g. 600); unset it for "
                          f"the default ({LOCK_TIMEOUT_S:.0f} s).")  # fmt: skip
    return seconds


@dataclass(frozen=True)
class Holder:
    """The process that holds a lock, as it recorded itself."""

    host: str
    pid: int
    since: datetime | None

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), datetime.now(timezone.utc))

    def describe(self) -> str:
        since = ""
        if self.since is not None:
            held = (datetime.now(timezone.utc) - self.since).total_seconds()
            since = f" since {self.since.isoformat(timespec='seconds')} ({held:.0f} s ago)"
        gone = ""
        if self.host == socket.gethostname() and not _running(self.pid):
            gone = " (no such process runs now)"
        return f"pid {self.pid} on host {self.host}{gone}{since}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _timed_out(name: str, timeout_s: float, holder: str, fix: str) -> StorageError:
    return StorageError(
        f"gave up waiting for lock '{name}' after {timeout_s:g} s: it is held by {holder}. {fix} To wait "
        f"longer, set ${LOCK_TIMEOUT_ENV} (seconds; default {LOCK_TIMEOUT_S:.0f})."
    )


# --- SQLite: a lock file and a holder file beside the database -------------------------------------------


def lock_file(database: str, name: str) -> Path:
    """The lock file of lock ``name`` beside the SQLite file ``database``."""
    return Path(f"{database}.{hashlib.sha256(name.encode()).digest()[:6].hex()}.lock")


def holder_file(lock: Path) -> Path:
    """Where the process holding ``lock`` writes its host, pid and start time (the lock file itself is
    truncated by every process that tries to take it, so it cannot hold them)."""
    return lock.with_name(lock.name + ".holder")


def _read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text())
        return Holder(str(data["host"]), int(data["pid"]), datetime.fromisoformat(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_holder(path: Path, holder: Holder, name: str) -> None:
    record = {"host": holder.host, "pid": holder.pid, "since": holder.since.isoformat() if holder.since else None}
    tmp = path.with_name(f"{path.name}.{holder.pid}.tmp")
    try:  # written aside, then renamed: a waiter never reads half of it
        tmp.write_text(json.dumps({**record, "lock": name}))
        os.replace(tmp, path)
    except OSError as e:  # only the message of a timed-out waiter loses its holder's name
        LOGGER.debug("could not write lock holder file %s: %s", path, e)


@contextmanager
def file_lock(database: str, name: str, timeout_s: float) -> Iterator[None]:
    """Hold lock ``name`` of the SQLite file ``database``, waiting ``timeout_s`` at most."""
    from filelock import FileLock, Timeout

    path = lock_file(database, name)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        LOGGER.info("waiting for lock '%s', held by %s", name, _file_holder(path))
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            fix = (
                f"Wait for it to finish, or stop it if it hangs; the lock is freed when it exits. If no yoloprune "
                f"process uses the database any more, a process it started may still hold the file open "
                f"(`fuser -v {path}` names it): stop that one, or, as a last resort, delete {path}."
            )
            raise _timed_out(name, timeout_s, _file_holder(path), fix) from None
    try:
        _write_holder(holder_file(path), Holder.me(), name)
        yield
    finally:
        holder_file(path).unlink(missing_ok=True)
        lock.release()


def _file_holder(path: Path) -> str:
    holder = _read_holder(holder_file(path))
    where = f"(lock file {path})"
    return f"{holder.describe()} {where}" if holder else f"a process that did not say which {where}"


# --- PostgreSQL: a session-level advisory lock ----------------------------------------------------------


def advisory_key(name: str) -> int:
    """The signed 64-bit key of lock ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def advisory_lock(engine: Engine, name: str, timeout_s: float) -> Iterator[None]:
    """Hold lock ``name`` on a PostgreSQL database, waiting ``timeout_s`` at most.

    The lock belongs to one database session (a pooled connection kept for the duration): it is released when
    the block ends, or by the server when the session ends (the process exits or loses its connection).
    """
    key = advisory_key(name)
    with engine.connect() as conn:
        _take(conn, key, name, timeout_s, engine.url.render_as_string(hide_password=True))
        me = Holder.me()
        tag = f"{_TAG} {me.pid} {int(time.time())} {me.host}"[:63]
        conn.execute(text("SELECT set_config('application_name', :tag, false)"), {"tag": tag})
        conn.commit()
        try:
            yield
        finally:
            _release(conn, key, name)


def _release(conn: Connection, key: int, name: str) -> None:
    try:
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        conn.execute(text("RESET application_name"))
        conn.commit()
    except SQLAlchemyError as e:
        if not is_transient(e):
            raise
        # The session is gone (a restart, a dropped connection), and the server released its locks with it.
        LOGGER.warning("lock '%s' was released with its lost database session (%s)", name, str(e).splitlines()[0])


def _take(conn: Connection, key: int, name: str, timeout_s: float, url: str) -> None:
    deadline = time.monotonic() + timeout_s
    announced = False
    while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
        conn.commit()  # not idle in a transaction while it waits
        left = deadline - time.monotonic()
        if left <= 0:
            holder, backend = _pg_holder(conn, key)
            fix = (
                f"Wait for it to finish, or stop it if it hangs; the lock is released when its database session "
                f"ends (it exits or loses its connection; an administrator can end the session with "
                f"`SELECT pg_terminate_backend({backend})` on {url})."
            )
            raise _timed_out(name, timeout_s, holder, fix)
        if not announced:
            LOGGER.info("waiting for lock '%s', held by %s", name, _pg_holder(conn, key)[0])
            announced = True
        time.sleep(min(POLL_S, left))
    conn.commit()


#: The session holding an advisory lock (``pg_advisory_lock(bigint)`` keeps the key's high and low 32 bits in
#: ``classid`` and ``objid``, with ``objsubid`` 1), and what ``pg_stat_activity`` shows of it.
_HOLDER_SQL = """
SELECT l.pid, a.application_name, a.client_addr, a.backend_start
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid::bigint = :hi AND l.objid::bigint = :lo
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _pg_holder(conn: Connection, key: int) -> tuple[str, int | None]:
    """The holder of lock ``key`` in words, and its database session's pid (None: released meanwhile)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    row = conn.execute(text(_HOLDER_SQL), {"hi": unsigned >> 32, "lo": unsigned & 0xFFFF_FFFF}).first()
    conn.commit()
    if row is None:
        return "a session that has just released it", None
    backend, application, client, started = row
    session = f"database session {backend}" + (f" from {client}" if client else "")
    parts = str(application or "").split(" ", 3)
    if len(parts) == 4 and parts[0] == _TAG and parts[1].isdigit() and parts[2].isdigit():
        since = datetime.fromtimestamp(int(parts[2]), timezone.utc)
        return f"{Holder(parts[3], int(parts[1]), since).describe()} ({session})", backend
    opened = f", opened {started.isoformat(timespec='seconds')}" if started else ""
    return f"{session}{opened}, application '{application or ''}' (not a yoloprune that names itself)", backend
