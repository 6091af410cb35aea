"""Reading from local disk or any fsspec URL: whole shards (with retries and a size-limited
local cache), the file system of a URL (with its own retries off, so that the retries here
are the only ones), and one translation of every way a read fails into a project error."""

from __future__ import annotations

import contextlib
import copy
import logging
import mmap
import os
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.core import split_protocol, url_to_fs

from pipeline.errors import PipelineError, ShardFormatError
from pipeline.io.disk_cache import DEFAULT_LIMIT, cached

log = logging.getLogger(__name__)


def _remote_errors() -> tuple[type[BaseException], ...]:
    """What a failed remote read raises: OS-level errors and timeouts, botocore's own (S3),
    and aiohttp's (a response broken off mid-body, over S3 or HTTP)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    with contextlib.suppress(ImportError):  # s3fs brings botocore and aiohttp
        from botocore.exceptions import BotoCoreError

        errors.append(BotoCoreError)
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError

        errors.append(ClientError)
    return tuple(errors)


REMOTE_ERRORS = _remote_errors()
_FILESYSTEMS: dict[tuple[int, str, str], AbstractFileSystem] = {}  # by process, protocol and options
_S3 = ("s3", "s3a")


def _one_attempt(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with botocore's retries off for S3 unless the caller set them."""
    if protocol not in _S3:
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
    return {**options, "config_kwargs": config}


def filesystem(url: str, options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The file system and path of ``url``: one instance per process and storage options,
    with the file system's own retries off (s3fs retries a failed call 5 times and botocore
    each of those up to 5 times: with S3's 15 s read timeout a dead endpoint took minutes to
    an hour per read). Reads here retry by themselves (see :func:`read_shard`). The options
    are copied first: botocore changes the dicts it is given."""
    if "::" in url:  # a chained URL: as fsspec makes it
        return url_to_fs(url, **copy.deepcopy(dict(options or {})))
    protocol = split_protocol(url)[0] or "file"
    given = copy.deepcopy(dict(options or {}))
    key = (os.getpid(), protocol, repr(sorted(given.items(), key=str)))
    fs = _FILESYSTEMS.get(key)
    cls = fsspec.get_filesystem_class(protocol)
    if fs is None:
        fs = cls(skip_instance_cache=True, **_one_attempt(protocol, given))
        if protocol in _S3:
            fs.retries = 1  # s3fs's own loop: one attempt
        _FILESYSTEMS[key] = fs
    return fs, cls._strip_protocol(url)


def _s3_hint(url: str, options: dict[str, Any] | None) -> str:
    """How to give an S3 endpoint and credentials, when a failed ``s3://`` read had neither."""
    given = {"key", "client_kwargs", "profile"} & set(options or {}) or \
        any(name in os.environ for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE"))
    if not url.startswith("s3://") or given:
        return ""
    return ("\n  (no S3 endpoint or credentials were given: set AWS_ENDPOINT_URL and AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, or pass storage_options={'key': ..., 'secret': ..., "
            "'client_kwargs': {'endpoint_url': ...}})")


@contextlib.contextmanager
def remote_errors(url: str, error: type[PipelineError], what: str = "shard",
                  options: dict[str, Any] | None = None) -> Iterator[None]:
    """Reading ``url`` (a ``what``): a failure becomes ``error`` naming it and saying what
    went wrong (not found, a directory, access denied or no credentials, unreachable), with
    a line on how to give S3 credentials and an endpoint when none were given."""
    try:
        yield
    except FileNotFoundError as e:
        raise error(f"{url}: {what} not found") from e
    except IsADirectoryError as e:
        raise error(f"{url}: expected a {what} file, found a directory") from e
    except PermissionError as e:
        raise error(f"{url}: access denied ({e}); check the credentials{_s3_hint(url, options)}") from e
    except REMOTE_ERRORS as e:
        lost = "no credentials" if type(e).__name__ == "NoCredentialsError" else "unreachable"
        raise error(f"{url}: {lost} ({str(e) or type(e).__name__}){_s3_hint(url, options)}") from e
    except IndexError as e:
        timeout = _hidden_timeout(e)
        if timeout is None:
            raise
        raise error(f"{url}: unreachable ({type(timeout).__name__}){_s3_hint(url, options)}") from e


def _hidden_timeout(e: IndexError) -> TimeoutError | None:
    """The read timeout an IndexError hides, if it hides one: s3fs 2026.9's
    ``S3File._fetch_range`` reads ``ex.args[0]`` of the ``FSTimeoutError`` a read timeout
    raises, which has no args."""
    return e.__context__ if isinstance(e.__context__, TimeoutError) else None


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
    """A remote shard's bytes; a read that fails on the way (a dropped connection, a
    timeout) is tried again ``retries`` times with exponential backoff (any fsspec file
    system, not only S3: see docs/design.md). Not found or no access fails at once."""
    with remote_errors(url, ShardFormatError, options=storage_options):
        for attempt in range(retries + 1):
            try:
                return _read_whole(url, storage_options)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                raise
            except REMOTE_ERRORS as e:
                why = str(e) or type(e).__name__  # a timeout may say nothing
                if attempt == retries:
                    raise ShardFormatError(f"{url}: read failed after {retries + 1} attempts "
                                           f"({why}){_s3_hint(url, storage_options)}") from e
                delay = backoff * 2**attempt
                log.warning("%s: read failed (%s); retry %d/%d in %.1fs", url, why, attempt + 1, retries, delay)
                time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _read_whole(url: str, storage_options: dict[str, Any]) -> bytes:
    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            data: bytes = f.read()
            return data
    except IndexError as e:
        timeout = _hidden_timeout(e)
        if timeout is None:
            raise
        raise timeout from e  # retried like any other timeout


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
