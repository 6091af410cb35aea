"""Deterministic ustar members, built fast: a header template filled in and checksummed
(:func:`tar_header`), a whole block's headers with numpy (:func:`tar_headers`), and a
block's members laid out as one array (:func:`tar_block`). Tests compare every byte with
``tarfile``'s own output; names too long for ustar fall back to ``tarfile``'s pax headers.
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

BLOCK = 512
RECORD = 20 * BLOCK


def _reference_header(name: str, size: int, fmt: Literal[0, 1, 2] = tarfile.USTAR_FORMAT) -> bytes:
    """A tar header built by :mod:`tarfile` with this writer's fixed metadata."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    return info.tobuf(format=fmt, encoding="utf-8", errors="strict")


# tarfile's header of an empty name and size, with the checksum field as spaces: every
# member's header is this template plus its name and size, and a recomputed checksum.
_TEMPLATE = bytearray(_reference_header("x", 0))
_TEMPLATE[0:100] = bytes(100)
_TEMPLATE[124:136] = bytes(12)
_TEMPLATE[148:156] = b" " * 8
_TEMPLATE_SUM = sum(_TEMPLATE)
_TEMPLATE_ROW = np.frombuffer(bytes(_TEMPLATE), dtype=np.uint8)
_MAX_FAST_SIZE = 8**11 - 1


def tar_header(name: str, size: int) -> bytes:
    """The ustar header block of one member; byte-identical to tarfile's (tested), about
    five times faster, which is most of the conversion time for small images. Names over
    100 bytes or members of 8 GiB and more get a POSIX pax extended header instead."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size > _MAX_FAST_SIZE:
        return _reference_header(name, size, tarfile.PAX_FORMAT)
    size_field = b"%011o\0" % size
    header = bytearray(_TEMPLATE)
    header[0:len(raw)] = raw
    header[124:136] = size_field
    header[148:155] = b"%06o\0" % (_TEMPLATE_SUM + sum(raw) + sum(size_field))
    return bytes(header)


def _octal(values: np.ndarray, digits: int) -> np.ndarray:
    """Zero-padded octal ASCII digits of each value, one row per value."""
    shifts = 3 * np.arange(digits - 1, -1, -1, dtype=np.int64)
    return ((values.astype(np.int64)[:, None] >> shifts) & 7).astype(np.uint8) + ord("0")


def tar_headers(names: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Many ustar header blocks at once, as ``(n, 512)`` uint8; row ``i`` equals
    ``tar_header(name_i, sizes[i])`` (tested). ``names`` are the NUL-padded ``(n, 100)``
    name fields; sizes must be below 8 GiB."""
    headers = np.empty((len(sizes), BLOCK), dtype=np.uint8)
    headers[:] = _TEMPLATE_ROW
    headers[:, :100] = names
    headers[:, 124:135] = _octal(sizes, 11)
    checksum = (_TEMPLATE_SUM + names.sum(axis=1, dtype=np.int64)
                + headers[:, 124:135].sum(axis=1, dtype=np.int64))
    headers[:, 148:154] = _octal(checksum, 6)
    headers[:, 154] = 0
    return headers


def tar_member(name: str, data: bytes) -> bytes:
    """One ustar member (header block, data, zero padding) with fixed metadata."""
    return tar_header(name, len(data)) + data + bytes(-len(data) % BLOCK)


def tar_end(size_so_far: int) -> bytes:
    """End-of-archive: two zero blocks, then zeros up to a whole 10 KiB record."""
    size = size_so_far + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-size % RECORD))


@dataclass(frozen=True)
class Rows:
    """One member of every sample of a block: sample ``i``'s data is ``data[i, :lengths[i]]``
    (the whole row when ``lengths`` is None). Bytes after a sample's data must be zero."""

    data: np.ndarray
    lengths: np.ndarray | None = None

    def sizes(self) -> np.ndarray:
        if self.lengths is None:
            return np.full(len(self.data), self.data.shape[1], dtype=np.int64)
        return self.lengths

    def row(self, i: int) -> bytes:
        end = self.data.shape[1] if self.lengths is None else int(self.lengths[i])
        return self.data[i, :end].tobytes()


Member = Rows | Sequence[bytes]  # one member of every sample of a block


def _name_fields(keys: np.ndarray, suffix: bytes) -> np.ndarray | None:
    """NUL-padded tar name fields ``<key><suffix>`` of ASCII ``keys`` (an ``S`` array), or
    None when a name would not fit the 100-byte field."""
    n, width = len(keys), keys.dtype.itemsize
    if width + len(suffix) > 100:
        return None
    names = np.zeros((n, 100), dtype=np.uint8)
    names[:, :width] = keys.view(np.uint8).reshape(n, width)
    lengths = np.char.str_len(keys)
    tail = np.frombuffer(suffix, dtype=np.uint8)
    if (lengths == width).all():
        names[:, width:width + len(tail)] = tail
    else:
        names[np.arange(n)[:, None], lengths[:, None] + np.arange(len(tail))] = tail
    return names


def tar_block(keys: Sequence[str], members: Sequence[tuple[str, Member]]) -> np.ndarray | None:
    """The tar members of a block of samples as one ``(n, sample_bytes)`` uint8 array, row
    ``i`` equal to sample ``i``'s :func:`tar_member` bytes; None unless every sample has the
    same padded size and every name is ASCII and fits the name field."""
    if not len(keys):
        return None
    try:
        key_bytes = np.array(keys, dtype="S")
    except UnicodeEncodeError:
        return None
    parts = []
    for ext, rows in members:
        if not isinstance(rows, Rows):
            return None
        sizes = rows.sizes()
        blocks = -(-sizes // BLOCK)
        names = _name_fields(key_bytes, f".{ext}".encode())
        if names is None or blocks.min() != blocks.max() or sizes.max() > _MAX_FAST_SIZE:
            return None
        parts.append((tar_headers(names, sizes), rows.data, BLOCK * int(blocks[0])))
    out = np.zeros((len(keys), sum(BLOCK + span for _, _, span in parts)), dtype=np.uint8)
    start = 0
    for headers, data, span in parts:
        width = min(data.shape[1], span)
        out[:, start:start + BLOCK] = headers
        out[:, start + BLOCK:start + BLOCK + width] = data[:, :width]
        start += BLOCK + span
    return out


_ZEROS = memoryview(bytes(BLOCK))


def tar_pieces(keys: Sequence[str], members: Sequence[tuple[str, Member]]) -> tuple[list[memoryview | bytes], int,
                                                                                    np.ndarray] | None:
    """The tar members of a block of samples whose sizes differ (JPEGs), without joining
    them: a flat list of pieces, ``k`` per sample (header block, data and padding of each
    member; a member of equal-sized rows as one piece per sample), and each sample's size
    in bytes. Sample ``i``'s pieces joined equal its :func:`tar_member` bytes. None when a
    name is not ASCII, does not fit the name field, or a member is 8 GiB or more."""
    n = len(keys)
    try:
        key_bytes = np.array(keys, dtype="S")
    except UnicodeEncodeError:
        return None
    columns: list[list[memoryview | bytes]] = []
    sizes = np.zeros(n, dtype=np.int64)
    for ext, rows in members:
        if isinstance(rows, Rows):
            block = tar_block(keys, [(ext, rows)])
            if block is None:
                return None
            columns.append([row.data for row in block])
            sizes += block.shape[1]
            continue
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=n)
        names = _name_fields(key_bytes, f".{ext}".encode())
        if names is None or (n and lengths.max() > _MAX_FAST_SIZE):
            return None
        headers = tar_headers(names, lengths)
        pads = (-lengths % BLOCK).tolist()
        datas: list[memoryview | bytes] = [d if isinstance(d, bytes) else bytes(d) for d in rows]  # never reused
        columns += [[row.data for row in headers], datas, [_ZEROS[:pad] for pad in pads]]
        sizes += BLOCK + lengths + (-lengths % BLOCK)
    pieces = [piece for sample in zip(*columns, strict=True) for piece in sample]
    return pieces, len(columns), sizes
