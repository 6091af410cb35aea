"""A fast reader of whole shards held in memory: an index of every member, no copies.

The loader reads a shard with one request and walks its tar headers here, recording
where each sample's members lie; member bytes are not copied until a batch is assembled.
Headers are ustar (with optional pax records for long names); a member that runs past
the end, a header that does not parse, or a missing end-of-archive marker is a
:class:`ShardFormatError` naming the shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import HeaderMismatchError, ShardFormatError, quoted
from pipeline.format.header import HEADER_MEMBER, header_mismatch
from pipeline.format.label_columns import LABELS_MEMBER
from pipeline.format.tar_read import BLOCK, KEY_CHARS, REGULAR, Member, iter_members, member_key, read_tar_header
from pipeline.format.tar_scan import CHECKSUM_DIGITS, SIZE_DIGITS, scan_members

_LABELS_NAME = LABELS_MEMBER.encode()


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


class _Columns:
    """Per-extension offset and size columns, grown one sample at a time."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.seen: set[str] = set()
        self.offsets: dict[str, list[int]] = {}
        self.sizes: dict[str, list[int]] = {}
        self.labels_member: tuple[int, int] | None = None  # found by a scan

    def add(self, key: str, ext: str, start: int, size: int, where: str) -> None:
        if not self.keys or key != self.keys[-1]:
            if key in self.seen:
                raise ShardFormatError(f"{where}: key {key!r} again: a key's members must be consecutive and "
                                       "each key unique in its shard")
            self.keys.append(key)
            self.seen.add(key)
            for column in (*self.offsets.values(), *self.sizes.values()):
                column.append(-1)
        if ext not in self.offsets:
            self.offsets[ext] = [-1] * len(self.keys)
            self.sizes[ext] = [-1] * len(self.keys)
        if self.offsets[ext][-1] >= 0:
            raise ShardFormatError(f"{where}: member {key}.{ext} repeated within its sample")
        self.offsets[ext][-1] = start
        self.sizes[ext][-1] = size

    def index(self, url: str, data: bytes, error: str | None = None,
              labels_member: tuple[int, int] | None = None) -> ShardIndex:
        arrays = {e: np.asarray(v, dtype=np.int64) for e, v in self.offsets.items()}
        sizes = {e: np.asarray(v, dtype=np.int64) for e, v in self.sizes.items()}
        return ShardIndex(url, data, self.keys, arrays, sizes, error=error, labels_member=labels_member)


def _check_header(member: Member, number: int, data: bytes, url: str, expected: bytes | None) -> None:
    """The ``__header__`` member: first, and (when ``expected`` is given) the split's header."""
    if number != 0:
        raise ShardFormatError(f"{url}: tar header at byte {member.header_at}: {HEADER_MEMBER!r} again; expected "
                               "it as the first member only")
    found = data[member.start:member.start + member.size]
    if expected is not None and found != expected:
        raise header_mismatch(url, bytes(found), expected)


def _sample_member(member: Member, number: int, url: str, labels_seen: bool) -> tuple[str, str]:
    """``(key, extension)`` of a member that must be a sample's."""
    where = f"{url}: tar header at byte {member.header_at}"
    if number == 0:
        raise ShardFormatError(f"{where}: expected first member {HEADER_MEMBER!r}, found {quoted(member.name)}")
    if not member.regular:
        raise ShardFormatError(f"{where}: member {quoted(member.name)}: expected a regular file, found tar type "
                               f"{chr(member.typeflag)!r}")
    if labels_seen:
        raise ShardFormatError(f"{where}: member {quoted(member.name)} after {LABELS_MEMBER!r}, which must be last")
    return member_key(member.name, where)


def index_shard(data: bytes, url: str, expected_header: bytes | None = None, *,
                tolerant: bool = False) -> ShardIndex:
    """Index a whole shard. The first member must be ``__header__`` (equal to
    ``expected_header`` when given); it is not a sample, nor is a trailing ``__labels__``.
    Every other member is ``<key>.<extension>`` (:func:`member_key`), a key's members
    consecutive, each key once. With ``tolerant``, a broken shard ends the index early with
    ``error`` set instead of raising; a header mismatch always raises. Shards whose samples
    all have the same layout (fixed-size images, as raw pixels give) are indexed with
    vectorized checks instead of a walk over every header."""
    columns, labels_member = _Columns(), None
    try:
        for number, member in enumerate(iter_members(data, url)):
            if member.name == HEADER_MEMBER:
                _check_header(member, number, data, url, expected_header)
                continue
            if member.name == LABELS_MEMBER and member.regular and labels_member is None:
                labels_member = (member.start, member.size)
                continue
            key, ext = _sample_member(member, number, url, labels_member is not None)
            if len(columns.keys) == 1 and key != columns.keys[0]:
                uniform = uniform_index(data, url, columns, member.header_at)
                if uniform is not None:
                    return uniform
                if _scanned(data, url, columns, member.header_at):
                    break
            columns.add(key, ext, member.start, member.size, f"{url}: tar header at byte {member.header_at}")
    except HeaderMismatchError:
        raise
    except ShardFormatError as e:
        if not tolerant:
            raise
        return columns.index(url, data, error=str(e))
    return columns.index(url, data, labels_member=labels_member or columns.labels_member)


def _scanned(data: bytes, url: str, columns: _Columns, second_start: int) -> bool:
    """The members from the second sample's first header on added to ``columns`` from a scan
    with array operations (:func:`scan_members`), if the scan accepts them all; False (and
    ``columns`` untouched) otherwise, and the caller walks on."""
    found = scan_members(data, second_start)
    if found is None:
        return False
    names, starts, sizes = found
    last = len(names) - 1 if names[-1] == LABELS_MEMBER else len(names)
    if any(name in (HEADER_MEMBER, LABELS_MEMBER) for name in names[:last]):
        return False  # the walk says what is wrong
    headers = (starts - BLOCK).tolist()
    for name, start, size, at in zip(names[:last], starts.tolist(), sizes.tolist(), headers, strict=False):
        where = f"{url}: tar header at byte {at}"
        key, ext = member_key(name, where)
        columns.add(key, ext, start, size, where)
    if last < len(names):
        columns.labels_member = (int(starts[-1]), int(sizes[-1]))
    return True


_KEY_CHARS = np.zeros(256, dtype=bool)
_KEY_CHARS[list(KEY_CHARS)] = True


_CHUNK = 1024  # header rows checked at a time: temporaries stay in cache


def _varying_mask(key_length: int) -> np.ndarray:
    """A header row as 64 uint64 words of bit masks: set on every byte that must equal the
    first row's (all but the key, the 11 size digits and the 6 checksum digits)."""
    mask = np.full(BLOCK, 0xFF, dtype=np.uint8)
    mask[np.r_[0:key_length, _VARYING]] = 0
    return mask.view(np.uint64)


_VARYING = np.r_[124:135, 148:154]  # size digits, checksum digits


def _rows_sound(rows: np.ndarray, key_length: int) -> np.ndarray:
    """Which member header rows equal the first row in every byte but the key, the size
    digits and the checksum digits (so they carry the same name suffix, type, magic and
    empty prefix), with a key of allowed characters, octal digits and a checksum that adds
    up: exactly the headers the walk would read the same way. Rows are checked a chunk at
    a time, each chunk copied once so that every check runs in cache."""
    mask, first = _varying_mask(key_length), np.ascontiguousarray(rows[0])
    fixed = first.view(np.uint64) & mask
    columns = np.r_[0:key_length, _VARYING]
    reference = int(first[columns[:-6]].sum(dtype=np.int64))  # key and size digits: what differs
    reference -= int((first[148:154].astype(np.int64) - ord("0")) @ CHECKSUM_DIGITS)
    same = np.empty(len(rows), dtype=bool)
    for start in range(0, len(rows), _CHUNK):
        chunk = np.ascontiguousarray(rows[start:start + _CHUNK])
        ok = ((chunk.view(np.uint64) & mask) == fixed).all(axis=1)
        varying = chunk[:, columns]
        ok &= _KEY_CHARS[varying[:, :key_length]].all(axis=1)
        digits = varying[:, key_length:] - np.uint8(ord("0"))  # wraps below '0': then >= 8
        ok &= (digits < 8).all(axis=1)
        checksum = digits[:, -6:].astype(np.int64) @ CHECKSUM_DIGITS  # the first row's was checked by the walk
        same[start:start + _CHUNK] = ok & (varying[:, :-6].sum(axis=1, dtype=np.int64) - checksum == reference)
    return same


def uniform_index(data: bytes, url: str, first: _Columns, second_start: int) -> ShardIndex | None:
    """The index of a shard whose samples all repeat the first sample's layout (same member
    names after the key, same header fields, same padded sizes), checked for every sample
    with array operations; None when any sample differs (the caller then walks every
    header, which names what is wrong)."""
    first_header = min(int(o[0]) for o in first.offsets.values()) - BLOCK
    stride = second_start - first_header
    count = (len(data) - first_header) // stride
    table = np.frombuffer(data, np.uint8, count * stride, first_header).reshape(count, stride)
    key_length = len(first.keys[0])
    valid = np.ones(count, dtype=bool)
    offsets, sizes = {}, {}
    for ext, column in first.offsets.items():
        at = int(column[0]) - BLOCK - first_header
        rows = table[:, at:at + BLOCK]
        valid &= _rows_sound(rows, key_length)
        valid &= (rows[:, :key_length] == table[:, :key_length]).all(axis=1)  # one key per sample
        size = (rows[:, 124:135].astype(np.int64) - ord("0")) @ SIZE_DIGITS
        valid &= -(-size // BLOCK) == -(-int(first.sizes[ext][0]) // BLOCK)
        offsets[ext], sizes[ext] = first_header + BLOCK + at + np.arange(count, dtype=np.int64) * stride, size
    count = int(np.argmin(valid)) if not valid.all() else count
    tail = first_header + count * stride
    labels_member = _trailing_labels(data, url, tail) if count >= 2 else None
    if labels_member is not None:
        tail = labels_member[0] + -(-labels_member[1] // BLOCK) * BLOCK
    if count < 2 or len(data) - tail < 2 * BLOCK or data[tail:tail + 2 * BLOCK].strip(b"\0"):
        return None
    keys = _split_keys(table[:count, :key_length])
    if len(set(keys)) != count:
        return None  # a key twice: the walk says which
    return ShardIndex(url, data, keys, {e: o[:count] for e, o in offsets.items()},
                      {e: v[:count] for e, v in sizes.items()}, stride=stride, labels_member=labels_member)


def _trailing_labels(data: bytes, url: str, at: int) -> tuple[int, int] | None:
    """``(start, size)`` of a ``__labels__`` member whose header is at ``at``, if there is one."""
    if len(data) - at <= 2 * BLOCK or data[at:at + len(_LABELS_NAME) + 1] != _LABELS_NAME + b"\0":
        return None
    name, size, typeflag = read_tar_header(data, at, url)
    if name != _LABELS_NAME or typeflag not in REGULAR or size > len(data) - at - BLOCK:
        return None
    return at + BLOCK, size


def _split_keys(rows: np.ndarray) -> list[str]:
    """Keys from a (count, length) byte table of allowed key characters (ASCII, no NUL)."""
    return [key.decode() for key in np.ascontiguousarray(rows).view(f"S{rows.shape[1]}").ravel().tolist()]


def count_samples(buf: bytes, url: str) -> int:
    return len(index_shard(buf, url))
