"""A size-limited local copy of remote shards: what ``make_loader(cache_dir=...)`` keeps.

Each remote shard is stored once under a name made of a hash of its URL and storage options
(the same URL on two endpoints is two copies) and its file name; it is written under a
temporary name and renamed into place, so a reader never sees half a file. When the cache
holds more than ``limit`` bytes, the least recently used copies go first (a hit refreshes a
copy's time) until it fits. Several processes (dataloader workers, ranks) may share one
directory: a copy deleted by another process's eviction between the look-up and the read
is a miss, never an error.

Why not fsspec's ``filecache``/``simplecache``: they keep copies but have no size limit or
eviction (only an expiry time), and their metadata file is rewritten by every process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 64 << 30  # bytes of shards kept in a cache directory
PARTIAL = ".partial-"
STALE_PARTIAL_S = 3600  # a partial copy this old was left by a killed process


def cache_name(url: str, options: dict[str, Any]) -> str:
    """The file name of ``url``'s copy: a hash of the URL and the storage options, then its
    own file name (so a listing stays readable)."""
    identity = f"{url}\0{sorted(options.items(), key=str)!r}" if options else url
    return hashlib.sha256(identity.encode()).hexdigest()[:16] + "-" + url.rsplit("/", 1)[-1]


def _read_copy(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: evicted last
    return data


def _entries(directory: Path) -> list[tuple[float, int, Path]]:
    """(last use, size, path) of every copy in ``directory``, and of partial copies left
    by killed processes (as if used at time 0: they go first)."""
    found, now = [], time.time()
    with os.scandir(directory) as listing:
        for entry in listing:
            if not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):
                stat = entry.stat(follow_symlinks=False)
                if not entry.name.startswith(PARTIAL):
                    found.append((stat.st_mtime, stat.st_size, Path(entry.path)))
                elif now - stat.st_mtime > STALE_PARTIAL_S:
                    found.append((0.0, stat.st_size, Path(entry.path)))
    return found


def evict(directory: Path, limit: int, keep: Path | None = None) -> int:
    """Remove the least recently used copies until ``directory`` holds at most ``limit``
    bytes (``keep`` is removed last of all); the bytes removed."""
    entries = sorted(_entries(directory), key=lambda e: (e[2] == keep, e[0]))
    total, removed = sum(size for _, size, _ in entries), 0
    for _, size, path in entries:
        if total <= limit:
            break
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += size
        total -= size
    if removed:
        log.debug("%s: evicted %d bytes to stay within %d", directory, removed, limit)
    return removed


def cached(url: str, options: dict[str, Any], directory: str, fetch: Callable[[], bytes],
           limit: int = DEFAULT_LIMIT) -> bytes:
    """``fetch()``'s bytes, from the copy in ``directory`` when there is one; otherwise
    fetched, stored, and the cache trimmed to ``limit`` bytes (a shard larger than the
    whole limit is returned but not kept)."""
    path = Path(directory) / cache_name(url, options)
    data = _read_copy(path)
    if data is not None:
        return data
    data = fetch()
    if len(data) > limit:
        return data
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=PARTIAL, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)
    evict(path.parent, limit, keep=path)
    return data
