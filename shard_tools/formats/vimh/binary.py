"""VIMH's binary split files (``train``/``test``): one record per sample, ``<HHH`` image
dimensions, optional float32 scale factors (a 14- or 6-byte record header), the label
count and ``(id, value)`` byte pairs, then the planar CHW pixels. Records all have record
0's size, so they are located by arithmetic and parsed with numpy."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from pipeline.errors import ConversionError
from shard_tools.formats.file_cache import latest_per_file
from shard_tools.formats.mh_pickles import MultiheadSplit, parse_label_lists, stat_key

DIMS = struct.Struct("<HHH")
HEADER_SIZES = (14, 6)  # dims + two float32 scale factors (v2+), or dims only (older files)


def load_binary(path: Path, header_hint: int | None) -> MultiheadSplit:
    return _load_binary(stat_key(path), header_hint)


@latest_per_file(lambda key, hint: (key[0], hint))
def _load_binary(key: tuple[str, int, int], header_hint: int | None) -> MultiheadSplit:
    path = Path(key[0])
    with open(path, "rb") as f:
        if key[2] == 0:
            raise ConversionError(f"{path}: empty file, expected VIMH binary records")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    header_size, count, size = _detect_layout(path, buf, header_hint)
    dims, n_params = DIMS.unpack_from(buf, 0), buf[header_size]
    records = np.frombuffer(buf, dtype=np.uint8, count=count * size).reshape(count, size)
    pixels_at = header_size + 1 + 2 * n_params
    ids, values = parse_label_lists(path, records[:, header_size:pixels_at])
    scales = None
    if header_size == 14:
        scales = np.ascontiguousarray(records[:, 6:14]).view("<f4").astype(np.float32)
    variant = "binary" if header_size == 14 else "binary-v1"
    return MultiheadSplit(path, variant, dims, ids, values, scales, records[:, pixels_at:])


Walk = tuple[int, int, str | None]  # whole records, record size, why the walk stopped early


def _walk(buf: mmap.mmap, header_size: int) -> Walk:
    """Records under one header-size hypothesis. Every record must have record 0's dims
    and N, hence its size, so records are checked all at once; the first that is not
    (or a cut-short tail) ends the walk with the reason."""
    end = len(buf)
    if header_size + 1 > end:
        return 0, 0, "truncated record 0 at byte 0: header cut short"
    dims, n = DIMS.unpack_from(buf, 0), buf[header_size]
    size = header_size + 1 + 2 * n + dims[0] * dims[1] * dims[2]
    records = np.frombuffer(buf, dtype=np.uint8, count=end // size * size).reshape(-1, size)
    differ = (records[:, :DIMS.size] != records[:1, :DIMS.size]).any(axis=1) | (records[:, header_size] != n)
    count = int(np.argmax(differ)) if differ.any() else len(records)
    off = count * size
    if off == end:
        return count, size, None
    if off + header_size + 1 > end:
        return count, size, f"truncated record {count} at byte {off}: header cut short"
    found = (DIMS.unpack_from(buf, off), buf[off + header_size])
    if found != (dims, n):
        return count, size, (f"record {count} at byte {off}: dims {found[0]} N={found[1]} differ "
                             f"from record 0's dims {dims} N={n}")
    return count, size, (f"truncated trailing record {count} at byte {off}: expected {size} bytes, "
                         f"found {end - off}")


def _detect_layout(path: Path, buf: mmap.mmap, hint: int | None) -> tuple[int, int, int]:
    """Which record header (14 or 6 bytes) the file uses: the one whose records tile the
    file exactly. Ambiguity is settled by the JSON hint or is an error, never a guess.
    Returns the header size, the record count and the record size."""
    walks = {hs: _walk(buf, hs) for hs in HEADER_SIZES}
    clean = [hs for hs, (_, _, err) in walks.items() if err is None]
    if len(clean) == 2 and hint is not None and hint in clean:
        clean = [hint]
    if len(clean) == 1:
        return clean[0], walks[clean[0]][0], walks[clean[0]][1]
    if len(clean) == 2:
        raise ConversionError(f"{path}: records parse both with a 14-byte header (dims + scale "
                              "factors) and a 6-byte header (dims only); set "
                              "label_encoding.metadata_bytes in vimh_dataset_info.json to 14 or 6")
    best = max(HEADER_SIZES, key=lambda hs: (walks[hs][0], hs == hint))
    count, _, err = walks[best]
    if not count:
        raise ConversionError(f"{path}: not a VIMH binary file: no record parses with a 14- or "
                              f"6-byte header ({walks[14][2]}; {walks[6][2]})")
    raise ConversionError(f"{path}: {err} (with a {best}-byte record header)")
