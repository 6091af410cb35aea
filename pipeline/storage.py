"""Reading whole shards from local disk or any fsspec URL, with retries and a local cache."""

from __future__ import annotations

import logging
import mmap
import os
import stat
import subprocess
import time
from typing import Any

import fsspec

from pipeline.disk_cache import DEFAULT_LIMIT, cached
from pipeline.errors import ShardFormatError

log = logging.getLogger(__name__)


def _remote_errors() -> tuple[type[BaseException], ...]:
    """What a failed remote read raises: OS-level errors, and botocore's own for S3."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError

        errors.append(BotoCoreError)
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    return tuple(errors)


REMOTE_ERRORS = _remote_errors()


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _run_pipe(url: str) -> bytes:
    done = subprocess.run(url[len("pipe:"):], shell=True, capture_output=True, check=False)
    if done.returncode:
        raise ShardFormatError(f"{url}: command exited {done.returncode}: "
                               f"{done.stderr.decode(errors='replace')[-500:]}")
    return done.stdout


def _fetch(url: str, storage_options: dict[str, Any], retries: int, backoff: float) -> bytes:
    for attempt in range(retries + 1):
        try:
            with fsspec.open(url, "rb", **storage_options) as f:
                data: bytes = f.read()
                return data
        except FileNotFoundError as e:
            raise ShardFormatError(f"{url}: shard not found") from e
        except PermissionError as e:
            raise ShardFormatError(f"{url}: access denied ({e}); check the credentials (AWS_* "
                                   "variables, ~/.aws, or storage_options key/secret)") from e
        except REMOTE_ERRORS as e:
            if attempt == retries:
                raise ShardFormatError(f"{url}: read failed after {retries + 1} attempts ({e})") from e
            delay = backoff * 2**attempt
            log.warning("%s: read failed (%s); retry %d/%d in %.1fs", url, e, attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "named pipe"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def local_file_size(url: str) -> int:
    """The size of a local shard, which must be a regular file (or a link to one): a
    directory, a device or a named pipe (opening one would block) is a ShardFormatError."""
    try:
        info = os.stat(_local_path(url))
    except FileNotFoundError as e:
        raise ShardFormatError(f"{url}: shard not found") from e
    except OSError as e:
        raise ShardFormatError(f"{url}: cannot be read ({e.strerror or e})") from e
    if not stat.S_ISREG(info.st_mode):
        raise ShardFormatError(f"{url}: expected a regular file, found a {_file_kind(info.st_mode)}")
    return info.st_size


def read_local(url: str) -> bytes:
    """A local shard's bytes, memory-mapped (pages come from the page cache as a batch
    touches them). Only a regular file (or a link to one) is read: a directory, a device
    or a named pipe (which would block forever) is a ShardFormatError."""
    path = _local_path(url)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except FileNotFoundError as e:
        raise ShardFormatError(f"{url}: shard not found") from e
    except OSError as e:
        raise ShardFormatError(f"{url}: cannot be opened ({e.strerror or e})") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ShardFormatError(f"{url}: expected a regular file, found a {_file_kind(info.st_mode)}")
        if info.st_size == 0:
            return b""
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)  # type: ignore[return-value]
    finally:
        os.close(fd)


def read_shard(url: str, *, storage_options: dict[str, Any] | None = None, retries: int = 3,
               backoff: float = 0.5, cache_dir: str | None = None, cache_limit: int = DEFAULT_LIMIT,
               allow_pipe: bool = False) -> bytes:
    """All bytes of one shard. ``pipe:`` URLs (shell commands) are refused unless allowed.
    A remote shard is kept in ``cache_dir`` (at most ``cache_limit`` bytes in all) when given."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ShardFormatError(f"{url}: pipe: URLs run shell commands; pass allow_pipe=True to allow them")
        return _run_pipe(url)
    if not is_remote(url):
        return read_local(url)
    options = storage_options or {}
    if cache_dir:
        return cached(url, options, cache_dir, lambda: _fetch(url, options, retries, backoff), cache_limit)
    return _fetch(url, options, retries, backoff)
