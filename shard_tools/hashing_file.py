"""Shard files written behind the caller's back: hashed and written on one background thread.

Hashing every byte costs about as much CPU as reading and writing it (sha256 runs at
about 2 GB/s here), so a :class:`HashingFile` gathers writes into batches of about
``FLUSH_BYTES`` and hands them to a :class:`WriteBehind`: one thread that hashes and
writes every batch, then finishes each file (its digest, and whatever the caller wants
done with it: a rename, a progress record), strictly in the order given. :mod:`hashlib`
and ``os.write`` release the GIL on large buffers, so the caller keeps reading and
encoding samples on another core meanwhile, across file boundaries too. A batch is joined
into one buffer first: one ``update`` and one ``write`` per batch. At most ``depth`` tasks
wait, so memory stays bounded. The first task that fails stops all later ones (no file
after a failed write is finished), and its error is raised in the caller at its next
submit or at :meth:`WriteBehind.wait`.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

FLUSH_BYTES = 1 << 20  # writes are gathered into batches of about this size
DEPTH = 8  # tasks waiting for the thread


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"write wrote nothing to file descriptor {fd}")
        view = view[written:]


class WriteBehind:
    """One background thread running tasks in order; see the module. With ``threaded=False``
    each task runs at once, in the caller's thread, with the same failure rule (for worker
    processes that already fill every core: a thread each would only add switching)."""

    def __init__(self, depth: int = DEPTH, *, threaded: bool = True) -> None:
        self._threaded = threaded
        self._depth = depth
        self._pending: deque[Future[None]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._failed = False

    def submit(self, task: Callable[..., None], *args: Any, always: bool = False) -> None:
        """Run ``task(*args)`` after every task submitted before it (skipped after a failed
        task, unless ``always``: closing a file); raise the error of a finished task here."""
        if not self._threaded:
            self._run(task, args, always)
            return
        if self._pool is None:  # started on first use: no thread exists when a caller forks first
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-behind")
        self._pending.append(self._pool.submit(self._run, task, args, always))  # queued even after a failure
        while self._pending and (len(self._pending) > self._depth or self._pending[0].done()):
            self._pending.popleft().result()

    def _run(self, task: Callable[..., None], args: tuple[Any, ...], always: bool) -> None:
        if self._failed and not always:
            return
        done = False
        try:
            task(*args)
            done = True
        finally:
            self._failed = self._failed or not done

    def wait(self) -> None:
        """Wait for every task; raise the first error. The thread ends until the next submit."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pending.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class HashingFile:
    """Write-only ``path`` whose bytes are hashed and written by ``writes``; ``size`` counts
    the bytes given so far. :meth:`close` hands the sha256 hex digest to a callback."""

    def __init__(self, path: Path, writes: WriteBehind) -> None:
        self.path = path
        self.size = 0
        self._writes = writes
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._sha = hashlib.sha256()
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0
        self._close_queued = False  # the descriptor is closed exactly once: its number may be reused

    def write(self, data: bytes | memoryview) -> None:
        self.write_many([data])

    def write_many(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Append ``pieces`` in order. They are written later: none may be changed afterwards."""
        for piece in pieces:
            size = memoryview(piece).nbytes
            if size:
                self._pending.append(piece)
                self._pending_size += size
                self.size += size
        if self._pending_size >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writes.submit(self._write_batch, self._pending)
            self._pending, self._pending_size = [], 0

    def _write_batch(self, batch: list[bytes | memoryview]) -> None:
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        self._sha.update(data)
        try:
            write_all(self._fd, data)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {self.path}: {e.strerror or e}", str(self.path)) from e

    def close(self, then: Callable[[str], None]) -> None:
        """Write what is pending and close, then call ``then(sha256 hex digest)``, all on
        the thread."""
        try:
            self._flush()
        finally:
            self._queue_close()
        self._writes.submit(lambda: then(self._sha.hexdigest()))

    def _queue_close(self) -> None:
        if not self._close_queued:
            self._close_queued = True  # set first: submit queues the task even when it raises
            self._writes.submit(os.close, self._fd, always=True)

    def discard(self) -> None:
        """Close without writing what is pending (the caller removes the file)."""
        self._pending = []
        self._queue_close()
