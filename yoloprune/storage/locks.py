"""Named locks across the processes and machines that share a database, with a wait that ends when it should.

SQLite (one machine): a lock file beside the database (``flock``, freed by the OS when its holder exits), and a
holder file beside it naming the process that holds it. PostgreSQL: a session-level advisory lock, taken with
``pg_try_advisory_lock`` in a loop; its holder is found in ``pg_locks`` and ``pg_stat_activity``, where the
holding session's ``application_name`` names the process (host, pid, since when).

How long a wait lasts. A lock may cover real work: one worker evaluates the unpruned baseline (a full validation,
which can pass half an hour on a CPU with a big validation set) while the others wait for its result. So the
timeout alone does not end a wait; the holder's health does:

- while the holder is *provably alive*, the waiter keeps waiting, and says so every :data:`NOTICE_S` seconds
  ("still waiting for lock ..., held by pid X on host Y since ...");
- once the wait passes its timeout (:data:`LOCK_TIMEOUT_S`; ``$YOLOPRUNE_LOCK_TIMEOUT_S``,
  ``Store(lock_timeout_s=...)``) and the holder cannot be shown alive, it fails with a
  :class:`~yoloprune.errors.StorageError` naming the holder and what to do;
- a holder alive for longer than the hard cap (:data:`LOCK_MAX_WAIT_S`, 24 h; ``$YOLOPRUNE_LOCK_MAX_WAIT_S``,
  ``Store(lock_max_wait_s=...)``) fails the wait too: it is alive but hangs.

Provably alive: on this host, its pid runs, is neither stopped nor a zombie, and (Linux) started before it took
the lock, so a reused pid does not count. On PostgreSQL, its database session is still in ``pg_stat_activity``
(and, when it names this host, its pid runs as above): the server ends the session of a process that exits. A
SQLite lock whose recorded holder is gone, or that names no holder, is held by a process that inherited the lock
file (``fuser`` names it): not provably alive. Judging the holder (not polling for the baseline's row) serves
every lock alike, the schema lock included.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from yoloprune.errors import ConfigError, StorageError
from yoloprune.log import get_logger

LOGGER = get_logger(__name__)

#: How long a lock is waited for by default (seconds) when its holder cannot be shown alive.
LOCK_TIMEOUT_S = 1800.0

#: The environment variable that overrides :data:`LOCK_TIMEOUT_S` (seconds), read when a Store is opened.
LOCK_TIMEOUT_ENV = "YOLOPRUNE_LOCK_TIMEOUT_S"

#: The longest wait (seconds) for a holder that is alive: past it, the holder is taken to hang.
LOCK_MAX_WAIT_S = 86400.0

#: The environment variable that overrides :data:`LOCK_MAX_WAIT_S` (seconds), read when a Store is opened.
LOCK_MAX_WAIT_ENV = "YOLOPRUNE_LOCK_MAX_WAIT_S"

#: How often a long wait says that it still waits, and for whom (seconds).
NOTICE_S = 300.0

#: How often, past the timeout, the waiter checks that the holder is still alive (seconds).
CHECK_S = 5.0

#: Longest pause between two tries of a PostgreSQL advisory lock (seconds).
POLL_S = 0.5

#: What a PostgreSQL session holding a lock calls itself (``application_name``, 63 bytes at most).
_TAG = "yoloprune-lock"


def lock_timeout_from_env() -> float:
    """:data:`LOCK_TIMEOUT_S`, or ``$YOLOPRUNE_LOCK_TIMEOUT_S`` where it is set."""
    return _seconds_from_env(LOCK_TIMEOUT_ENV, LOCK_TIMEOUT_S)


def lock_max_wait_from_env() -> float:
    """:data:`LOCK_MAX_WAIT_S`, or ``$YOLOPRUNE_LOCK_MAX_WAIT_S`` where it is set."""
    return _seconds_from_env(LOCK_MAX_WAIT_ENV, LOCK_MAX_WAIT_S)


def _seconds_from_env(variable: str, default: float) -> float:
    value = os.environ.get(variable, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"${variable}={value!r} is not a number of seconds >= 0 (e.g. 600); unset it for "
                          f"the default ({default:.0f} s).")  # fmt: skip
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

    def local(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether this process provably still runs (on this host only: elsewhere it cannot be told)."""
        return self.local() and _process_alive(self.pid, self.since)

    def describe(self) -> str:
        since = ""
        if self.since is not None:
            held = (datetime.now(timezone.utc) - self.since).total_seconds()
            since = f" since {self.since.isoformat(timespec='seconds')} ({held:.0f} s ago)"
        gone = ""
        if self.local() and not self.alive():
            gone = " (no such process runs now)"
        return f"pid {self.pid} on host {self.host}{gone}{since}"


def _process_alive(pid: int, since: datetime | None) -> bool:
    """``pid`` exists, is not stopped or a zombie, and (where /proc tells) started before ``since``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return True  # no /proc (macOS): the pid's existence is all there is
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3, starttime field 22
    if fields[0] in ("T", "t", "Z", "X"):  # stopped, traced, zombie, dead
        return False
    if since is None:
        return True
    age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    started = time.time() - age
    return started <= since.timestamp() + 2.0  # a later process that reused the pid is not the holder


@dataclass(frozen=True)
class Seen:
    """A lock's holder as a waiter sees it: in words, whether it is provably alive, and how to free the lock."""

    words: str
    alive: bool
    fix: str


def _wait(
    name: str, take: Callable[[float], bool], look: Callable[[], Seen], timeout_s: float, max_wait_s: float
) -> None:
    """Call ``take(seconds)`` (True: the lock is taken) until it succeeds or the wait should end (module docstring)."""
    start = time.monotonic()
    if take(0.0):
        return
    LOGGER.info("waiting for lock '%s', held by %s", name, look().words)
    max_wait_s = max(max_wait_s, timeout_s)
    notice = start + NOTICE_S
    while True:
        now = time.monotonic()
        waited = now - start
        if waited >= timeout_s:
            seen = look()
            if not seen.alive or waited >= max_wait_s:
                raise _timed_out(name, timeout_s, max_wait_s, seen)
        if now >= notice:
            LOGGER.warning("still waiting for lock '%s' (%.0f s so far), held by %s", name, waited, look().words)
            notice += NOTICE_S
        step = timeout_s - waited if waited < timeout_s else min(CHECK_S, max_wait_s - waited)
        if take(max(0.0, min(step, CHECK_S, notice - now))):
            return


def _timed_out(name: str, timeout_s: float, max_wait_s: float, seen: Seen) -> StorageError:
    if seen.alive:
        return StorageError(
            f"gave up waiting for lock '{name}' after {max_wait_s:g} s: it is held by {seen.words}, which still "
            f"runs but has held it longer than any lock should take. {seen.fix} To wait longer, set "
            f"${LOCK_MAX_WAIT_ENV} (seconds; default {LOCK_MAX_WAIT_S:.0f})."
        )
    return StorageError(
        f"gave up waiting for lock '{name}' after {timeout_s:g} s: it is held by {seen.words}, which cannot be shown "
        f"to run any more. {seen.fix} To wait longer, set ${LOCK_TIMEOUT_ENV} (seconds; default {LOCK_TIMEOUT_S:.0f})."
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
def file_lock(database: str, name: str, timeout_s: float, max_wait_s: float = LOCK_MAX_WAIT_S) -> Iterator[None]:
    """Hold lock ``name`` of the SQLite file ``database``; the wait ends as the module docstring says."""
    from filelock import FileLock, Timeout

    path = lock_file(database, name)
    lock = FileLock(str(path))

    def take(wait_s: float) -> bool:
        try:
            lock.acquire(timeout=wait_s, poll_interval=min(0.05, wait_s) or 0.05)
        except Timeout:
            return False
        return True

    _wait(name, take, lambda: _file_holder(path), timeout_s, max_wait_s)
    try:
        _write_holder(holder_file(path), Holder.me(), name)
        yield
    finally:
        holder_file(path).unlink(missing_ok=True)
        lock.release()


def _file_holder(path: Path) -> Seen:
    holder = _read_holder(holder_file(path))
    fix = (
        f"Wait for it to finish, or stop it if it hangs; the lock is freed when it exits. If no yoloprune process "
        f"uses the database any more, a process it started may still hold the file open (`fuser -v {path}` names "
        f"it): stop that one, or, as a last resort, delete {path}."
    )
    where = f"(lock file {path})"
    if holder is None:
        return Seen(f"a process that did not say which {where}", False, fix)
    return Seen(f"{holder.describe()} {where}", holder.alive(), fix)


# --- PostgreSQL: a session-level advisory lock ----------------------------------------------------------


def advisory_key(name: str) -> int:
    """The signed 64-bit key of lock ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def advisory_lock(engine: Engine, name: str, timeout_s: float, max_wait_s: float = LOCK_MAX_WAIT_S) -> Iterator[None]:
    """Hold lock ``name`` on a PostgreSQL database; the wait ends as the module docstring says.

    The lock belongs to one database session (a pooled connection kept for the duration): it is released when
    the block ends, or by the server when the session ends (the process exits or loses its connection). Whatever
    interrupts the acquisition or the release (Ctrl-C between two statements included), the connection is then
    discarded, not returned to the pool: closing its session is what surely frees a lock it may hold.
    """
    key = advisory_key(name)
    url = engine.url.render_as_string(hide_password=True)
    conn = engine.connect()
    try:
        _take(conn, key, name, timeout_s, max_wait_s, url)
        me = Holder.me()
        tag = f"{_TAG} {me.pid} {int(time.time())} {me.host}"[:63]
        conn.execute(text("SELECT set_config('application_name', :tag, false)"), {"tag": tag})
        conn.commit()
    except BaseException:
        _discard(conn)
        raise
    try:
        yield
    finally:
        _release(conn, key, name)


def _discard(conn: Connection) -> None:
    """Close ``conn``'s database session for good (the server frees its locks with it)."""
    try:
        conn.invalidate()
    finally:
        conn.close()


def _release(conn: Connection, key: int, name: str) -> None:
    try:
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        conn.execute(text("RESET application_name"))
        conn.commit()
    except BaseException as e:
        _discard(conn)
        if not isinstance(e, SQLAlchemyError):
            raise
        # The session is gone (a restart, a dropped connection) or failed: discarded, it holds no lock any more.
        LOGGER.warning("lock '%s' was released with its database session (%s)", name, str(e).splitlines()[0])
        return
    conn.close()


def _take(conn: Connection, key: int, name: str, timeout_s: float, max_wait_s: float, url: str) -> None:
    def take(wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            conn.commit()  # not idle in a transaction while it waits
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL_S, left))
        conn.commit()
        return True

    _wait(name, take, lambda: _pg_holder(conn, key, url), timeout_s, max_wait_s)


#: The session holding an advisory lock (``pg_advisory_lock(bigint)`` keeps the key's high and low 32 bits in
#: ``classid`` and ``objid``, with ``objsubid`` 1), and what ``pg_stat_activity`` shows of it.
_HOLDER_SQL = """
SELECT l.pid, a.pid, a.application_name, a.client_addr, a.backend_start
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid::bigint = :hi AND l.objid::bigint = :lo
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _pg_holder(conn: Connection, key: int, url: str) -> Seen:
    """The holder of lock ``key``: alive while its session is in ``pg_stat_activity`` (and, when it names this
    host, its process runs); a lock released meanwhile counts as alive, for the next try takes it."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    row = conn.execute(text(_HOLDER_SQL), {"hi": unsigned >> 32, "lo": unsigned & 0xFFFF_FFFF}).first()
    conn.commit()
    if row is None:
        return Seen("a session that has just released it", True, "Try again.")
    backend, active, application, client, started = row
    fix = (
        f"Wait for it to finish, or stop it if it hangs; the lock is released when its database session ends (it "
        f"exits or loses its connection; an administrator can end the session with "
        f"`SELECT pg_terminate_backend({backend})` on {url})."
    )
    session = f"database session {backend}" + (f" from {client}" if client else "")
    parts = str(application or "").split(" ", 3)
    if len(parts) == 4 and parts[0] == _TAG and parts[1].isdigit() and parts[2].isdigit():
        holder = Holder(parts[3], int(parts[1]), datetime.fromtimestamp(int(parts[2]), timezone.utc))
        alive = active is not None and (holder.alive() or not holder.local())
        return Seen(f"{holder.describe()} ({session})", alive, fix)
    opened = f", opened {started.isoformat(timespec='seconds')}" if started else ""
    words = f"{session}{opened}, application '{application or ''}' (not a yoloprune that names itself)"
    return Seen(words, active is not None, fix)
