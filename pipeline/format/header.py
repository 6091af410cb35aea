"""The ``__header__`` member: the dataset schema embedded first in every shard."""

from __future__ import annotations

from typing import IO

from pipeline.errors import HeaderMismatchError, SchemaError, ShardFormatError, quoted
from pipeline.format.schema import MAX_HEADER_BYTES, DatasetSchema
from pipeline.format.tar_read import BLOCK, REGULAR, read_tar_header

HEADER_MEMBER = "__header__"


def header_bytes(schema: DatasetSchema) -> bytes:
    """The header payload: the schema's canonical JSON in UTF-8."""
    return schema.to_json().encode("utf-8")


def parse_header_json(data: bytes, where: str) -> DatasetSchema:
    try:
        return DatasetSchema.from_json(data, where=f"{where}: {HEADER_MEMBER}")
    except SchemaError as e:
        raise ShardFormatError(str(e)) from e


def header_mismatch(url: str, found: bytes, expected: bytes) -> HeaderMismatchError:
    """The error for a shard whose header differs from its split's, naming what differs."""
    try:
        a, b = parse_header_json(expected, "expected").to_dict(), parse_header_json(found, url).to_dict()
    except ShardFormatError as e:
        return HeaderMismatchError(f"{url}: header differs from its split's and does not parse ({e})")
    diff = "; ".join(f"{k}: expected {quoted(a.get(k))}, found {quoted(b.get(k))}"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    return HeaderMismatchError(f"{url}: header differs from its split's: {diff}")


def _read_exactly(stream: IO[bytes], size: int, what: str, where: str) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise ShardFormatError(f"{where}: {what}: truncated: expected {size} bytes, found {len(data)}")
        data += chunk
    return data


def read_header_from(stream: IO[bytes], where: str) -> DatasetSchema:
    """Read the schema from the first member of the tar ``stream`` (positioned at 0): one
    header block, checked as the loader checks every block, then at most
    ``MAX_HEADER_BYTES`` of JSON."""
    block = _read_exactly(stream, BLOCK, "the first tar header", where)
    if block == bytes(BLOCK):
        raise ShardFormatError(f"{where}: expected a first member {HEADER_MEMBER!r}, found an empty tar")
    name, size, typeflag = read_tar_header(block, 0, where)
    if name != HEADER_MEMBER.encode() or typeflag not in REGULAR:
        found = quoted(name.decode(errors="replace"))
        raise ShardFormatError(f"{where}: expected first member {HEADER_MEMBER!r}, found {found}")
    if size > MAX_HEADER_BYTES:
        raise ShardFormatError(f"{where}: {HEADER_MEMBER}: expected at most {MAX_HEADER_BYTES} bytes, found {size}")
    return parse_header_json(_read_exactly(stream, size, HEADER_MEMBER, where), where)
