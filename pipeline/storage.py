"""Reading whole shards from local disk or any fsspec URL, with retries and a local cache."""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec

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


def _cached(url: str, options: dict[str, Any], cache_dir: str, fetch: Any) -> bytes:
    """``fetch()``'s bytes, kept in ``cache_dir`` under a name from the URL and the storage
    options (the same URL on two endpoints is two objects)."""
    identity = f"{url}\0{sorted(options.items(), key=str)!r}" if options else url
    name = hashlib.sha256(identity.encode()).hexdigest()[:16] + "-" + url.rsplit("/", 1)[-1]
    path = Path(cache_dir) / name
    if path.exists():
        return path.read_bytes()
    data: bytes = fetch()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".partial-", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)
    return data


def read_shard(url: str, *, storage_options: dict[str, Any] | None = None, retries: int = 3,
               backoff: float = 0.5, cache_dir: str | None = None, allow_pipe: bool = False) -> bytes:
    """All bytes of one shard. ``pipe:`` URLs (shell commands) are refused unless allowed."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ShardFormatError(f"{url}: pipe: URLs run shell commands; pass allow_pipe=True to allow them")
        return _run_pipe(url)
    if not is_remote(url):
        try:
            with open(_local_path(url), "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""
                # mapped, not read: pages come from the page cache as a batch touches them
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # type: ignore[return-value]
        except FileNotFoundError as e:
            raise ShardFormatError(f"{url}: shard not found") from e
    options = storage_options or {}
    if cache_dir:
        return _cached(url, options, cache_dir, lambda: _fetch(url, options, retries, backoff))
    return _fetch(url, options, retries, backoff)
