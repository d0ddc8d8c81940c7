"""Which database errors a retry may cure, and retries that never write a row twice.

Transient errors (a dropped connection, a database restart, a busy SQLite file) are told from the rest by the
driver's error class and code, never by the words of its message. :func:`retry_transient` retries a call that
is safe to repeat; :func:`retry_write` retries an insert that is not, looking first for what the failed attempt
may have committed before its acknowledgement was lost.
"""

from __future__ import annotations

import functools
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError

from yoloprune.errors import InternalError
from yoloprune.log import get_logger

LOGGER = get_logger(__name__)

#: Waits between attempts when the database is briefly unreachable (about 30 s in all).
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)

P = ParamSpec("P")
R = TypeVar("R")


#: PostgreSQL SQLSTATEs of a lost or refused connection, besides class 08 (connection exception) as a whole: the
#: server shut down (admin_shutdown, crash_shutdown), is starting up (cannot_connect_now), ended an idle session
#: (idle_session_timeout) or has no connection slot free (too_many_connections). A retry may cure them.
TRANSIENT_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P05", "53300"})

#: PostgreSQL SQLSTATEs of a transaction the server rolled back to settle a conflict with another one
#: (serialization_failure, deadlock_detected): the same call, run again, may pass. A retry may cure them.
CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})

#: PostgreSQL SQLSTATEs after which the database cannot take the search's writes: disk_full, database_dropped.
LOST_SQLSTATES = frozenset({"53100", "57P04"})

#: SQLite primary result codes a retry may cure: SQLITE_BUSY (another connection writes), SQLITE_LOCKED.
TRANSIENT_SQLITE_CODES = frozenset({5, 6})

#: SQLite primary result codes of a database file that is gone, replaced or full: SQLITE_READONLY (its
#: extended SQLITE_READONLY_DBMOVED: the file was deleted or moved), SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL,
#: SQLITE_CANTOPEN (its folder was removed), SQLITE_NOTADB.
LOST_SQLITE_CODES = frozenset({8, 10, 11, 13, 14, 26})

#: Python 3.10's sqlite3 errors carry no result code: SQLite's fixed wording of the codes above.
_SQLITE_WORDS = {
    "database is locked": "conflict",
    "database table is locked": "conflict",
    "attempt to write a readonly database": "lost",
    "disk I/O error": "lost",
    "database disk image is malformed": "lost",
    "database or disk is full": "lost",
    "unable to open database file": "lost",
    "file is not a database": "lost",
}


def _driver_kind(error: BaseException | None) -> str | None:
    """What ``error``, a database driver's own exception, says by its class and code: "connection" (lost or
    refused), "conflict" (busy, locked, rolled back for a conflict), "lost" (the database gone or full), or None."""
    if isinstance(error, sqlite3.OperationalError):
        code = getattr(error, "sqlite_errorcode", None)  # Python >= 3.11
        if code is None:
            return _SQLITE_WORDS.get(str(error))
        if code & 0xFF in TRANSIENT_SQLITE_CODES:  # an extended code (SQLITE_BUSY_SNAPSHOT...) holds its primary
            return "conflict"
        return "lost" if code & 0xFF in LOST_SQLITE_CODES else None
    for module, code_attribute in (("psycopg", "sqlstate"), ("psycopg2", "pgcode")):
        driver = sys.modules.get(module)  # optional extras: an error of theirs exists only once they are imported
        if driver is not None and isinstance(error, driver.OperationalError):
            sqlstate = getattr(error, code_attribute, None)
            # No SQLSTATE: libpq itself failed (connection refused, lost or timed out), no server answered.
            if sqlstate is None or sqlstate.startswith("08") or sqlstate in TRANSIENT_SQLSTATES:
                return "connection"
            if sqlstate in CONFLICT_SQLSTATES:
                return "conflict"
            return "lost" if sqlstate in LOST_SQLSTATES else None
    return None


def error_kind(error: BaseException | None) -> str | None:
    """The first kind :func:`_driver_kind` finds along ``error``'s ``__cause__`` chain (a connection SQLAlchemy
    saw die is "connection"), or None: an error of no database driver, or one no retry or stop is for (a missing
    table, a constraint violation, a statement timeout). ``__context__`` is not followed: an error raised while
    another was handled (Ctrl-C in a retry's pause) is not that error."""
    while error is not None:
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return "connection"
        kind = _driver_kind(error.orig if isinstance(error, DBAPIError) else error)
        if kind is not None:
            return kind
        error = error.__cause__
    return None


def is_transient(error: BaseException | None) -> bool:
    """A lost or refused connection, a busy SQLite file or a transaction rolled back for a conflict (deadlock,
    serialization failure), which a retry may cure (not a missing table or a constraint). Judged by the driver's
    error class and code (SQLSTATE, SQLite result code), not by its text (but on Python 3.10, whose sqlite3
    errors carry no code)."""
    return error_kind(error) in ("connection", "conflict")


def database_lost(error: BaseException | None) -> bool:
    """Whether ``error``, past its retries, means the database cannot take the search's writes any more: a lost
    connection, a full disk, a database file deleted, replaced or unreadable, a dropped database. A busy file,
    a deadlock or a statement timeout fails one call only."""
    return error_kind(error) in ("connection", "lost")


def retry_transient(fn: Callable[P, R]) -> Callable[P, R]:
    """Retry ``fn`` with backoff while it fails with a transient database error."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        for delay in RETRY_DELAYS_S:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not is_transient(e):
                    raise
                LOGGER.warning("storage unreachable (%s); retrying in %.1f s", str(e).splitlines()[0][:200], delay)
                time.sleep(delay)
        return fn(*args, **kwargs)

    return wrapper


def retry_write(write: Callable[[], R], written: Callable[[], R | None]) -> R:
    """Run ``write`` with :func:`retry_transient`'s backoff, but never twice in the database.

    A commit can succeed and its acknowledgement be lost (the connection drops in between): the client sees a
    transient error although the row is there. So before each retry, ``written`` looks for what the failed
    attempt would have written (by a key chosen once, before the first attempt) and returns the result it stands
    for, or None when the attempt left nothing; ``write`` runs again only then. ``R`` is never None.
    """
    failed = False
    for delay in (*RETRY_DELAYS_S, None):
        try:
            if failed and (found := written()) is not None:
                LOGGER.info("the write that seemed to fail had been committed; not repeated")
                return found
            failed = True
            return write()
        except Exception as e:
            if delay is None or not is_transient(e):
                raise
            LOGGER.warning("storage unreachable (%s); retrying in %.1f s", str(e).splitlines()[0][:200], delay)
            time.sleep(delay)
    raise InternalError("retry_write: its last attempt neither returned nor raised.")


def lost_insert_race(e: BaseException) -> bool:
    """True when ``e`` is a unique-key violation: another process inserted the same row first."""
    return isinstance(e, IntegrityError) or isinstance(e.__cause__, IntegrityError)
