"""A fast reader of whole shards held in memory: an index of every member, no copies.

The loader reads a shard with one request and walks its tar headers here, recording
where each sample's members lie; member bytes are not copied until a batch is assembled.
Headers are ustar (with optional pax records for long names); a member that runs past
the end, a header that does not parse, or a missing end-of-archive marker is a
:class:`ShardFormatError` naming the shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.errors import HeaderMismatchError, ShardFormatError
from pipeline.header import HEADER_MEMBER, header_mismatch
from pipeline.label_columns import LABELS_MEMBER

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_HEADER_NAME = HEADER_MEMBER.encode()
_LABELS_NAME = LABELS_MEMBER.encode()
_PAX = ord("x")
_REGULAR = (ord("0"), 0)


@dataclass(frozen=True)
class ShardIndex:
    """A whole shard in memory with the position of every sample's members.

    ``offsets[ext][i]`` and ``sizes[ext][i]`` locate member ``ext`` of sample ``i`` in
    ``data`` (-1 where the sample lacks it). ``stride`` is set when every sample occupies the
    same number of bytes (then member ``ext`` of sample ``i`` starts at
    ``offsets[ext][0] + i * stride``). ``error`` says why the walk stopped early (tolerant
    mode only)."""

    url: str
    data: bytes
    keys: list[str]
    offsets: dict[str, np.ndarray]
    sizes: dict[str, np.ndarray]
    stride: int | None = None
    error: str | None = None
    labels_member: tuple[int, int] | None = None  # (start, size) of a trailing __labels__ member

    def __len__(self) -> int:
        return len(self.keys)

    def member(self, ext: str, i: int) -> memoryview | None:
        offsets = self.offsets.get(ext)
        if offsets is None or offsets[i] < 0:
            return None
        start = int(offsets[i])
        return memoryview(self.data)[start:start + int(self.sizes[ext][i])]


def split_key(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name by webdataset's rule: the key ends at the first
    dot after the last slash; None when there is no such dot or the key's last part is empty."""
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    return None if dot <= base else (name[:dot], name[dot + 1:])


def _octal(field: bytes, where: str) -> int:
    if field and field[0] & 0x80:  # base-256, as GNU tar writes sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = field.strip(b"\0 ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError as e:
        raise ShardFormatError(f"{where}: expected an octal number in a tar header, found {field!r}") from e


def _pax_path(data: bytes) -> bytes | None:
    """The ``path`` record of a pax extended header, if any."""
    for record in data.split(b"\n"):
        _, _, keyvalue = record.partition(b" ")
        key, _, value = keyvalue.partition(b"=")
        if key == b"path":
            return value
    return None


def _member_header(buf: bytes, pos: int, url: str, long_name: bytes | None) -> tuple[bytes, int, int]:
    """``(name, size, typeflag)`` of the ustar header at ``pos``."""
    if buf[pos + 257:pos + 262] != b"ustar":
        raise ShardFormatError(f"{url}: byte {pos}: expected a tar header, found corrupt data")
    nul = buf.find(b"\0", pos, pos + 100)
    name = long_name or buf[pos:nul if nul >= 0 else pos + 100]
    if buf[pos + 345] and long_name is None:
        name = buf[pos + 345:pos + 500].split(b"\0", 1)[0] + b"/" + name
    try:
        size = int(buf[pos + 124:pos + 135], 8)
    except ValueError:
        size = _octal(buf[pos + 124:pos + 136], f"{url}: member {name!r}")
    return name, size, buf[pos + 156]


def iter_members(buf: bytes, url: str) -> Iterator[tuple[bytes, int, int]]:
    """``(name, start, size)`` of every regular member, in order."""
    end, pos = len(buf), 0
    long_name: bytes | None = None
    while pos + BLOCK <= end:
        if buf[pos] == 0 and buf[pos:pos + BLOCK] == _ZERO_BLOCK:
            return
        name, size, typeflag = _member_header(buf, pos, url, long_name)
        start = pos + BLOCK
        if start + size > end:
            raise ShardFormatError(f"{url}: member {name.decode(errors='replace')!r}: truncated: expected "
                                   f"{size} bytes, found {end - start}")
        pos = start + -(-size // BLOCK) * BLOCK
        long_name = None
        if typeflag == _PAX:
            long_name = _pax_path(buf[start:start + size])
        elif typeflag in _REGULAR:
            yield name, start, size
    raise ShardFormatError(f"{url}: missing end-of-archive marker after byte {pos}: the shard is truncated")


class _Columns:
    """Per-extension offset and size columns, grown one sample at a time."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.offsets: dict[str, list[int]] = {}
        self.sizes: dict[str, list[int]] = {}

    def add(self, key: str, ext: str, start: int, size: int) -> None:
        if not self.keys or key != self.keys[-1]:
            self.keys.append(key)
            for column in (*self.offsets.values(), *self.sizes.values()):
                column.append(-1)
        if ext not in self.offsets:
            self.offsets[ext] = [-1] * len(self.keys)
            self.sizes[ext] = [-1] * len(self.keys)
        self.offsets[ext][-1] = start
        self.sizes[ext][-1] = size

    def index(self, url: str, data: bytes, error: str | None = None,
              labels_member: tuple[int, int] | None = None) -> ShardIndex:
        arrays = {e: np.asarray(v, dtype=np.int64) for e, v in self.offsets.items()}
        sizes = {e: np.asarray(v, dtype=np.int64) for e, v in self.sizes.items()}
        return ShardIndex(url, data, self.keys, arrays, sizes, error=error, labels_member=labels_member)


def index_shard(data: bytes, url: str, expected_header: bytes | None = None, *,
                tolerant: bool = False) -> ShardIndex:
    """Index a whole shard. The ``__header__`` member is checked against ``expected_header``
    (when given) and is not a sample. Members group into samples by key (webdataset's rule:
    the key ends at the first dot after the last slash). With ``tolerant``, a broken tar
    ends the index early with ``error`` set instead of raising; a header mismatch always
    raises. Shards whose samples all have the same layout (fixed-size images, as raw
    pixels give) are indexed with vectorized checks instead of a walk over every header."""
    columns, walk = _Columns(), iter_members(data, url)
    labels_member = None
    try:
        for index, (name, start, size) in enumerate(walk):
            if name == _LABELS_NAME:
                labels_member = (start, size)
                continue
            if name == _HEADER_NAME:
                if index == 0 and expected_header is not None and data[start:start + size] != expected_header:
                    raise header_mismatch(url, data[start:start + size], expected_header)
                continue
            parts = split_key(name.decode(errors="replace"))
            if parts is None:
                raise ShardFormatError(f"{url}: member {name.decode(errors='replace')!r}: expected "
                                       "<key>.<extension>")
            if len(columns.keys) == 1 and parts[0] != columns.keys[0]:
                uniform = uniform_index(data, url, columns, start - BLOCK)
                if uniform is not None:
                    return uniform
            columns.add(*parts, start, size)
    except HeaderMismatchError:
        raise
    except ShardFormatError as e:
        if not tolerant:
            raise
        return columns.index(url, data, error=str(e))
    return columns.index(url, data, labels_member=labels_member)


def uniform_index(data: bytes, url: str, first: _Columns, second_start: int) -> ShardIndex | None:
    """The index of a shard whose samples all repeat the first sample's layout (same member
    names after the key, same padded sizes), checked for every sample with array operations;
    None when any sample differs (the caller then walks every header)."""
    first_header = min(int(o[0]) for o in first.offsets.values()) - BLOCK
    stride = second_start - first_header
    count = (len(data) - first_header) // stride
    table = np.frombuffer(data, np.uint8, count * stride, first_header).reshape(count, stride)
    key = first.keys[0].encode()
    valid = np.ones(count, dtype=bool)
    offsets, sizes = {}, {}
    for ext, column in first.offsets.items():
        at = int(column[0]) - BLOCK - first_header
        name = np.frombuffer((key + b"." + ext.encode()).ljust(100, b"\0"), np.uint8)
        valid &= (table[:, at + len(key):at + 100] == name[len(key):]).all(axis=1)
        valid &= (table[:, at + 257:at + 262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1)
        valid &= (table[:, at:at + len(key)] == table[:, :len(key)]).all(axis=1)  # one key per sample
        digits = table[:, at + 124:at + 135].astype(np.int64) - ord("0")
        valid &= ((digits >= 0) & (digits < 8)).all(axis=1)
        size = digits @ (8 ** np.arange(10, -1, -1, dtype=np.int64))
        valid &= -(-size // BLOCK) == -(-int(first.sizes[ext][0]) // BLOCK)
        offsets[ext], sizes[ext] = first_header + BLOCK + at + np.arange(count, dtype=np.int64) * stride, size
    count = int(np.argmin(valid)) if not valid.all() else count
    tail = first_header + count * stride
    labels_member = None
    if count >= 2 and len(data) - tail > 2 * BLOCK and data[tail:tail + len(_LABELS_NAME) + 1] == _LABELS_NAME + b"\0":
        _, labels_size, _ = _member_header(data, tail, url, None)
        labels_member = (tail + BLOCK, labels_size)
        tail += BLOCK + -(-labels_size // BLOCK) * BLOCK
    if count < 2 or len(data) - tail < 2 * BLOCK or data[tail:].strip(b"\0"):
        return None
    keys = _split_keys(table[:count, :len(key)])
    return ShardIndex(url, data, keys, {e: o[:count] for e, o in offsets.items()},
                      {e: v[:count] for e, v in sizes.items()}, stride=stride, labels_member=labels_member)


def _split_keys(rows: np.ndarray) -> list[str]:
    """Equal-length keys from a (count, length) byte table."""
    text = rows.tobytes().decode()
    width = rows.shape[1]
    return [text[i:i + width] for i in range(0, len(text), width)]


def count_samples(buf: bytes, url: str) -> int:
    return len(index_shard(buf, url))
