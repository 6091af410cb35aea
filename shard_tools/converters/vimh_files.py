"""Readers for the two VIMH split files: the pickle variant and the binary variant.

Both give a :class:`VimhSplit`: pixels as planar CHW bytes, each sample's
``(param_id, quantized value)`` pairs, and optional per-sample scale factors.
"""

from __future__ import annotations

import functools
import mmap
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConversionError

DIMS = struct.Struct("<HHH")
SCALES = struct.Struct("<ff")
HEADER_SIZES = (14, 6)  # dims + two float32 scale factors (v2+), or dims only (older files)


@dataclass(frozen=True)
class VimhSplit:
    """One decoded split file. ``ids`` are the parameter ids every sample carries (in
    file order), ``values[i, j]`` the quantized value of ``ids[j]`` for sample ``i``."""

    path: Path
    variant: str
    dims: tuple[int, int, int] | None
    ids: tuple[int, ...]
    values: np.ndarray
    scale_factors: np.ndarray | None
    _images: Sequence[bytes | memoryview] | np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def image(self, i: int) -> bytes:
        img = self._images[i]
        return img.tobytes() if isinstance(img, np.ndarray) else bytes(img)


def parse_label_lists(path: Path, lists: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], np.ndarray]:
    """Check ``[N, id0, val0, ...]`` lists: lengths 1+2N, one N and one id set for all."""
    first: tuple[int, ...] | None = None
    values = np.zeros((len(lists), 0), dtype=np.uint8)
    for i, entry in enumerate(lists):
        entry = [int(x) for x in entry]
        n = entry[0] if entry else -1
        if n < 0 or len(entry) != 1 + 2 * n:
            raise ConversionError(f"{path}: sample {i}: label list {entry[:9]} has {len(entry)} "
                                  f"entries, expected 1+2N = {1 + 2 * max(n, 0)} for N = {n}")
        ids, vals = tuple(entry[1::2]), entry[2::2]
        if first is None:
            first = ids
            values = np.zeros((len(lists), n), dtype=np.uint8)
        elif ids != first:
            what = f"N = {n}" if n != len(first) else f"parameter ids {list(ids)}"
            raise ConversionError(f"{path}: sample {i}: {what}, but sample 0 has N = {len(first)} "
                                  f"with parameter ids {list(first)} (mixed N across samples)")
        bad = [v for v in vals if not 0 <= v <= 255]
        if bad:
            raise ConversionError(f"{path}: sample {i}: quantized values must be 0..255, found {bad}")
        values[i] = vals
    return first or (), values


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


def load_pickle(path: Path) -> VimhSplit:
    return _load_pickle(_stat_key(path))


@functools.lru_cache(maxsize=4)
def _load_pickle(key: tuple[str, int, int]) -> VimhSplit:
    path = Path(key[0])
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")  # source files are the user's own data
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise ConversionError(f"{path}: expected a VIMH pickle, found a truncated or corrupt "
                              f"file ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict) or "data" not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ConversionError(f"{path}: expected a dict with 'data' and 'vimh_labels', found {found}")
    labels = batch.get("vimh_labels", batch.get("labels"))
    if labels is None:
        raise ConversionError(f"{path}: expected 'vimh_labels', found keys {sorted(batch)}")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2:
        raise ConversionError(f"{path}: 'data' expected uint8 of shape (n, H*W*C), "
                              f"found {data.dtype} of shape {data.shape}")
    if len(labels) != len(data):
        raise ConversionError(f"{path}: 'data' has {len(data)} rows but 'vimh_labels' has "
                              f"{len(labels)} entries")
    ids, values = parse_label_lists(path, labels)
    dims = tuple(int(batch[k]) for k in ("height", "width", "channels")) if all(
        k in batch for k in ("height", "width", "channels")) else None
    scales = batch.get("scale_factors")
    return VimhSplit(path, "pickle", dims, ids, values,  # type: ignore[arg-type]
                     None if scales is None else np.asarray(scales, dtype=np.float32), data)


def load_binary(path: Path, header_hint: int | None) -> VimhSplit:
    return _load_binary(_stat_key(path), header_hint)


@functools.lru_cache(maxsize=4)
def _load_binary(key: tuple[str, int, int], header_hint: int | None) -> VimhSplit:
    path = Path(key[0])
    with open(path, "rb") as f:
        if key[2] == 0:
            raise ConversionError(f"{path}: empty file, expected VIMH binary records")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    header_size, offsets = _detect_layout(path, buf, header_hint)
    dims = DIMS.unpack_from(buf, 0)
    n_params = buf[header_size]
    pixels = dims[0] * dims[1] * dims[2]
    lists, images, scales = [], [], []
    for off in offsets:
        start = off + header_size + 1
        lists.append([n_params, *buf[start:start + 2 * n_params]])
        images.append(memoryview(buf)[start + 2 * n_params:start + 2 * n_params + pixels])
        if header_size == 14:
            scales.append(SCALES.unpack_from(buf, off + 6))
    ids, values = parse_label_lists(path, lists)
    variant = "binary" if header_size == 14 else "binary-v1"
    return VimhSplit(path, variant, dims, ids, values,
                     np.asarray(scales, dtype=np.float32) if scales else None, images)


def _walk(buf: mmap.mmap, header_size: int) -> tuple[list[int], str | None]:
    """Record offsets under one header-size hypothesis, and why the walk stopped early."""
    offsets: list[int] = []
    first: tuple[tuple[int, int, int], int] | None = None
    off, end = 0, len(buf)
    while off < end:
        if off + header_size + 1 > end:
            return offsets, f"truncated record {len(offsets)} at byte {off}: header cut short"
        dims = DIMS.unpack_from(buf, off)
        n = buf[off + header_size]
        if first is None:
            first = (dims, n)
        elif (dims, n) != first:
            return offsets, (f"record {len(offsets)} at byte {off}: dims {dims} N={n} differ from "
                             f"record 0's dims {first[0]} N={first[1]}")
        size = header_size + 1 + 2 * n + dims[0] * dims[1] * dims[2]
        if off + size > end:
            return offsets, (f"truncated trailing record {len(offsets)} at byte {off}: expected "
                             f"{size} bytes, found {end - off}")
        offsets.append(off)
        off += size
    return offsets, None


def _detect_layout(path: Path, buf: mmap.mmap, hint: int | None) -> tuple[int, list[int]]:
    """Which record header (14 or 6 bytes) the file uses: the one whose records tile the
    file exactly. Ambiguity is settled by the JSON hint or is an error, never a guess."""
    walks = {hs: _walk(buf, hs) for hs in HEADER_SIZES}
    clean = [hs for hs, (_, err) in walks.items() if err is None]
    if len(clean) == 1:
        return clean[0], walks[clean[0]][0]
    if len(clean) == 2:
        if hint is not None and hint in clean:
            return hint, walks[hint][0]
        raise ConversionError(f"{path}: records parse both with a 14-byte header (dims + scale "
                              "factors) and a 6-byte header (dims only); set "
                              "label_encoding.metadata_bytes in vimh_dataset_info.json to 14 or 6")
    best = max(HEADER_SIZES, key=lambda hs: (len(walks[hs][0]), hs == hint))
    offsets, err = walks[best]
    if not offsets:
        raise ConversionError(f"{path}: not a VIMH binary file: no record parses with a 14- or "
                              f"6-byte header ({walks[14][1]}; {walks[6][1]})")
    raise ConversionError(f"{path}: {err} (with a {best}-byte record header)")
