"""The rest of a shard's members found and checked with array operations, for shards whose
samples vary in layout (JPEGs of varying size) but whose headers are plain: ustar, regular
files, names in the name field, sizes in 11 octal digits, checksums as ``tarfile`` writes
them. A hop over the size fields finds the headers; every check the strict walk
(:mod:`pipeline.format.tar_read`) makes is then made on all of them at once. Anything else
gives None, and the caller walks the headers one by one, which names what is wrong.
"""

from __future__ import annotations

import numpy as np

from pipeline.format.tar_read import BLOCK, REGULAR, ZERO_BLOCK

_USTAR = np.frombuffer(b"ustar", np.uint8)
SIZE_DIGITS = 8 ** np.arange(10, -1, -1, dtype=np.int64)  # weights of a size field's 11 octal digits
CHECKSUM_DIGITS = 8 ** np.arange(5, -1, -1, dtype=np.int64)  # and of a checksum field's 6
_REGULAR = np.array(REGULAR, dtype=np.uint8)
_CHUNK = 2048  # header rows checked at a time


def _hop(data: bytes, start: int) -> tuple[list[int], int] | None:
    """The header offsets from ``start`` to the end-of-archive block, and where that block
    is, reading only the size fields (checked properly afterwards); None if a size field is
    not a number or the hop leaves the file."""
    end, pos, headers = len(data), start, []
    while pos + BLOCK <= end and data[pos] != 0:
        try:
            size = int(data[pos + 124:pos + 135], 8)
        except ValueError:
            return None
        headers.append(pos)
        pos += BLOCK + -(-size // BLOCK) * BLOCK
    if pos + BLOCK > end or data[pos:pos + BLOCK] != ZERO_BLOCK:
        return None
    return headers, pos


def _rows_plain(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which header rows are plain (magic, regular file, no prefix, octal size and checksum
    fields as ``tarfile`` writes them, checksum right), and their sizes."""
    digits = rows[:, 124:135] - np.uint8(ord("0"))  # wraps below '0': then >= 8
    sums = rows[:, 148:154] - np.uint8(ord("0"))
    ok = (rows[:, 257:262] == _USTAR).all(axis=1) & np.isin(rows[:, 156], _REGULAR) & (rows[:, 345] == 0)
    ok &= (digits < 8).all(axis=1) & (rows[:, 135] == 0) & (sums < 8).all(axis=1)
    ok &= (rows[:, 154] == 0) & (rows[:, 155] == ord(" "))
    total = rows.sum(axis=1, dtype=np.int64) - rows[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * ord(" ")
    ok &= total == sums.astype(np.int64) @ CHECKSUM_DIGITS
    return ok, digits.astype(np.int64) @ SIZE_DIGITS


def scan_members(data: bytes, start: int) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """Names, data offsets and sizes of every member from the header at ``start`` to the end
    of the archive, when all their headers are plain and check out; else None."""
    hop = _hop(data, start)
    if hop is None or not hop[0]:
        return None
    headers = np.asarray(hop[0], dtype=np.int64)
    table = np.frombuffer(data, np.uint8, hop[1])
    names: list[str] = []
    sizes = np.empty(len(headers), dtype=np.int64)
    for at in range(0, len(headers), _CHUNK):
        rows = table[headers[at:at + _CHUNK, None] + np.arange(BLOCK)]
        ok, sizes[at:at + _CHUNK] = _rows_plain(rows)
        if not ok.all():
            return None
        raw = np.ascontiguousarray(rows[:, :100]).view("S100").ravel().tolist()
        if any(b"\0" in name or not name.isascii() for name in raw):
            return None  # the walk reads such names and says what is wrong with them
        names += [name.decode("ascii") for name in raw]
    follows = np.append(headers[1:], hop[1])
    if (follows != headers + BLOCK + -(-sizes // BLOCK) * BLOCK).any():
        return None  # a size field the hop read differently
    return names, headers + BLOCK, sizes
