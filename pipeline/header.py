"""The ``__header__`` member: the dataset schema embedded first in every shard."""

from __future__ import annotations

import tarfile
from typing import IO, Any

import fsspec

from pipeline.errors import HeaderMismatchError, SchemaError, ShardFormatError
from pipeline.schema import DatasetSchema
from pipeline.storage import REMOTE_ERRORS

HEADER_MEMBER = "__header__"


def header_bytes(schema: DatasetSchema) -> bytes:
    """The header payload: the schema's canonical JSON in UTF-8."""
    return schema.to_json().encode("utf-8")


def parse_header(data: bytes, where: str) -> DatasetSchema:
    try:
        return DatasetSchema.from_json(data, where=f"{where}: {HEADER_MEMBER}")
    except SchemaError as e:
        raise ShardFormatError(str(e)) from e


def header_mismatch(url: str, found: bytes, expected: bytes) -> HeaderMismatchError:
    """The error for a shard whose header differs from its split's, naming what differs."""
    try:
        a, b = parse_header(expected, "expected").to_dict(), parse_header(found, url).to_dict()
    except ShardFormatError as e:
        return HeaderMismatchError(f"{url}: header differs from its split's and does not parse ({e})")
    diff = "; ".join(f"{k}: expected {a.get(k)!r}, found {b.get(k)!r}"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    return HeaderMismatchError(f"{url}: header differs from its split's: {diff}")


def read_header_from(stream: IO[bytes], where: str) -> DatasetSchema:
    """Read the schema from the first member of the tar ``stream`` (positioned at 0)."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            first = tar.next()
            if first is None:
                raise ShardFormatError(f"{where}: expected a first member {HEADER_MEMBER!r}, "
                                       "found an empty tar")
            if first.name != HEADER_MEMBER:
                raise ShardFormatError(f"{where}: expected first member {HEADER_MEMBER!r}, "
                                       f"found {first.name!r}")
            member = tar.extractfile(first)
            data = member.read() if member is not None else b""
    except tarfile.TarError as e:
        raise ShardFormatError(f"{where}: expected a tar file, found unreadable data ({e})") from e
    return parse_header(data, where)


def read_header(url: str, storage_options: dict[str, Any] | None = None) -> DatasetSchema:
    """Read the schema embedded in the shard at ``url`` (local path or fsspec URL)."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return read_header_from(f, url)
    except FileNotFoundError as e:
        raise ShardFormatError(f"{url}: shard not found") from e
    except PermissionError as e:
        raise ShardFormatError(f"{url}: access denied ({e}); check the credentials") from e
    except REMOTE_ERRORS as e:
        raise ShardFormatError(f"{url}: unreachable ({e})") from e
