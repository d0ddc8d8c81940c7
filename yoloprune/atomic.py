"""Write a final artifact (checkpoint, ONNX, model card, report) so that its name never holds half a file.

Each writer writes a hidden temporary file in the same folder, which is flushed, fsynced and then renamed
over the final name (``os.replace``: atomic on one file system); on any failure the temporary file is
removed. The file gets the permissions of the one it replaces, or those a plain ``open()`` would give it. A write that fails for want of space or permission becomes an :class:`OutputWriteError` naming the
file, the cause and the fix.

It sits in the bottom layer (the checkpoints in :mod:`yoloprune.ultra` are its lowest user) and imports nothing
of Ultralytics or torch, so the reports use it without loading the ML stack.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from yoloprune.errors import YoloPruneError

#: Below this much free space (and 2% of the file system), a write error without an errno (torch's own writer
#: given a file name, Ultralytics' checkpoints) is taken for a full disk.
NEARLY_FULL_BYTES = 1 << 20

#: The fix a message suggests when its caller gives none.
DEFAULT_FIX = "write to a folder that has room and is writable"


class OutputWriteError(YoloPruneError):
    """A result file cannot be written (disk full, read-only folder, permission denied)."""


def ensure_writable(folder: str | Path, *, fix: str = DEFAULT_FIX) -> Path:
    """Create ``folder`` if needed and check a file can be written in it; an :class:`OutputWriteError` otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".yoloprune-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise write_error(folder, e, fix=fix, folder=folder) or e from e
    return folder


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fix: str = DEFAULT_FIX) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer to fill; on success it becomes ``path``.

    For writers that take a file name (ONNX export, ``DataFrame.to_csv``). On failure nothing is left: the
    temporary file is removed and ``path``, if it existed, is unchanged.
    """
    path = Path(path)
    ensure_writable(path.parent, fix=fix)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _mode_for(path))  # mkstemp's 0600 would make reports and models private to their writer
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        error = write_error(path, e, fix=fix) if isinstance(e, Exception) else None
        if error is None:
            raise
        raise error from e


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", *, fix: str = DEFAULT_FIX) -> Iterator[IO[Any]]:
    """Yield an open temporary file beside ``path``; once written and closed it becomes ``path``.

    Writing through a Python file object (``torch.save(obj, f)``) reports a full disk as ``OSError(ENOSPC)``,
    where torch's own writer given a file name raises a bare ``RuntimeError``.
    """
    with atomic_path(path, fix=fix) as tmp, open(tmp, mode) as f:
        yield f


def write_text(path: str | Path, text: str, *, fix: str = DEFAULT_FIX) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_file(path, "w", fix=fix) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes, *, fix: str = DEFAULT_FIX) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_file(path, "wb", fix=fix) as f:
        f.write(data)
    return Path(path)


def write_error(
    path: str | Path, error: BaseException, *, fix: str = DEFAULT_FIX, folder: str | Path | None = None
) -> OutputWriteError | None:
    """An :class:`OutputWriteError` naming ``path``, the cause and ``fix``, when ``error`` is a failed write
    (an ``OSError`` in its chain, or any error while the file system is nearly full); None otherwise.
    ``folder`` (default: ``path``'s) is the one the message asks to free or make writable."""
    path = Path(path)
    folder = Path(folder) if folder is not None else path.parent
    os_error = _os_error(error)
    code = os_error.errno if os_error is not None else None
    free = _free_bytes(folder)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and _nearly_full(folder)):
        room = f" ({_size(free)} free)" if free is not None else ""
        cause = f"no space left on the file system holding {folder}{room}. Free space there, or {fix}"
    elif code == errno.EROFS:
        cause = f"{folder} is on a read-only file system. Remount it read-write, or {fix}"
    elif code in (errno.EACCES, errno.EPERM):
        cause = f"permission denied in {folder}. Make it writable (chmod u+w '{folder}'), or {fix}"
    elif os_error is not None:
        cause = f"{os_error.strerror or os_error}. Check {folder}, or {fix}"
    else:
        return None
    if isinstance(error, OutputWriteError):
        return error
    what = f"write in {path}" if path == folder else f"write {path}"
    return OutputWriteError(f"cannot {what}: {cause}.")


def is_disk_full(error: BaseException, folder: str | Path) -> bool:
    """Whether ``error`` is a write that failed for want of space in ``folder``'s file system."""
    os_error = _os_error(error)
    if os_error is not None:
        return os_error.errno in (errno.ENOSPC, errno.EDQUOT)
    return _nearly_full(Path(folder))


def _os_error(error: BaseException | None) -> OSError | None:
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _usage(folder: Path) -> Any:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate)
            except OSError:
                return None
    return None


def _free_bytes(folder: Path) -> int | None:
    usage = _usage(folder)
    return None if usage is None else int(usage.free)


def _nearly_full(folder: Path) -> bool:
    usage = _usage(folder)
    return usage is not None and usage.free < min(NEARLY_FULL_BYTES, 0.02 * usage.total)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def _mode_for(path: Path) -> int:
    """The permissions ``path`` gets: those of the file it replaces, else what a plain ``open()`` would give a
    new file (0o666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without a window in which another thread's new file would get a wrong one:
    from ``/proc/self/status`` (Linux >= 4.7), else set and restored under a lock."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o077)  # the narrowest for the instant it is set
        os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible on every platform, so best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
