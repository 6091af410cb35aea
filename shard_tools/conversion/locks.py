"""One conversion of a split at a time: a ``flock`` on a lock file in the split's directory.

A second conversion of the same split fails at once, naming the first, instead of mixing
its staging with the first one's. Node shares of a split hold the lock shared (side by
side, but never beside a one-machine run of the split). A killed holder's lock is free
once its worker processes are gone too (they die with it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import ConversionError

log = logging.getLogger(__name__)

LOCK = ".convert.lock"
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # a file system without flock


@contextlib.contextmanager
def conversion_lock(directory: Path, name: str = LOCK, *, shared: bool = False) -> Iterator[None]:
    """Hold ``directory/name`` (``flock``) while a conversion writes there, so that a second
    conversion of the same split fails at once, naming the holder, instead of mixing its
    staging with this one's. ``shared``: held by several at once (the node shares of one
    split), but never together with an exclusive holder (a one-machine run of it). A killed
    holder's lock is free once its worker processes are gone too. The file, and the
    directory if it is left empty, go on release; on a file system without locks there is
    a warning and no lock."""
    path = directory / name
    fd = _take_lock(directory, path, shared)
    try:
        yield
    finally:
        if fd is not None:
            _release_lock(directory, path, fd, shared)


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _take_lock(directory: Path, path: Path, shared: bool) -> int | None:
    while True:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileExistsError, FileNotFoundError):
            continue  # the directory came and went as a holder let go: try again
        try:
            if not _flock(fd, path, directory, shared):
                os.close(fd)
                return None
            if _same_file(path, fd):
                if not shared:
                    os.ftruncate(fd, 0)
                    os.write(fd, str(os.getpid()).encode())
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # locked a file its holder had just removed: take the new one


def _flock(fd: int, path: Path, directory: Path, shared: bool) -> bool:
    """Lock ``fd``; False where the file system has no locks. A held lock is an error."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError as e:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        who = f"process {holder} or its worker processes" if holder else "node shares of this split"
        raise ConversionError(f"{path}: another conversion ({who}) is writing {directory}; wait for it to "
                              "finish, or convert to another directory") from e
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise
        log.warning("%s: the file system has no locks (%s): a second conversion of this split at the same time "
                    "would not be stopped", path, e)
        return False
    return True


def _release_lock(directory: Path, path: Path, fd: int, shared: bool) -> None:
    """Remove the lock file (if it is still ours, and, when shared, nobody else holds it)
    while still holding it, then let go and remove the directory if it is empty."""
    try:
        if shared:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only the last holder gets this
            except BlockingIOError:
                return
        if _same_file(path, fd):
            path.unlink()
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        directory.rmdir()  # only if empty: a failed first run leaves no directory behind
