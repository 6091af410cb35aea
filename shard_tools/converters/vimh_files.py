"""Readers for the two VIMH split files: the pickle variant and the binary variant.

Both give a :class:`VimhSplit`: pixels as planar CHW bytes, each sample's
``(param_id, quantized value)`` pairs, and optional per-sample scale factors. Formats that
share VIMH's pickle layout (CIFAR-100-MH) read it with their own :class:`PickleKind`. Valid
input is parsed with numpy, all samples at once: label lists of one length are checked
as one array (a bad one is then found by walking them, so its error names it), and
binary records, which all have record 0's size, are located by arithmetic.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import pickle
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConversionError
from shard_tools.converters.file_cache import latest_per_file

DIMS = struct.Struct("<HHH")
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
    images: np.ndarray  # (n, H*W*C) uint8, one row per sample (may be a strided view)

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class PickleKind:
    """A pickle variant with VIMH's layout: its name in messages, the keys its label lists
    may be under (the first is preferred and named in messages), and the largest label
    value (None: unchecked here, the caller checks each head's range)."""

    what: str = "VIMH"
    label_keys: tuple[str, ...] = ("vimh_labels", "labels")
    max_value: int | None = 255


VIMH_PICKLE = PickleKind()
Labels = tuple[tuple[int, ...], np.ndarray]


def parse_label_lists(path: Path, lists: Sequence[Sequence[int]] | np.ndarray,
                      max_value: int | None = 255) -> Labels:
    """Check ``[N, id0, val0, ...]`` lists: lengths 1+2N, one N and one id set for all,
    values 0..max_value. Returns the ids and the ``(n, N)`` values (uint8; int64 when
    ``max_value`` is None, and then unchecked)."""
    table = _as_table(lists)
    parsed = None if table is None else _parse_table(table, max_value)
    return parsed if parsed is not None else _parse_each(path, lists, max_value)


def _as_table(lists: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray | None:
    """The lists as one 2-D integer array, or None when they are ragged or not integers."""
    try:
        table = np.asarray(lists)
    except (ValueError, TypeError, OverflowError):
        return None
    return table if table.ndim == 2 and len(table) and table.dtype.kind in "iu" else None


def _parse_table(table: np.ndarray, max_value: int | None = 255) -> Labels | None:
    """:func:`parse_label_lists` of equal-length lists at numpy speed; None when any list
    is bad (the per-list walk then names it)."""
    n, ids, values = int(table[0, 0]), table[:, 1::2], table[:, 2::2]
    if n < 0 or table.shape[1] != 1 + 2 * n or (table[:, 0] != n).any() or (ids != ids[0]).any():
        return None
    if max_value is not None and ((values < 0) | (values > max_value)).any():
        return None
    return tuple(int(i) for i in ids[0]), values.astype(_value_dtype(max_value))


def _value_dtype(max_value: int | None) -> type[np.integer]:
    return np.uint8 if max_value is not None and max_value <= 255 else np.int64


def _parse_each(path: Path, lists: Sequence[Sequence[int]] | np.ndarray,
                max_value: int | None = 255) -> Labels:
    """:func:`parse_label_lists` one list at a time, raising on the first bad one."""
    first: tuple[int, ...] | None = None
    values = np.zeros((len(lists), 0), dtype=_value_dtype(max_value))
    for i, entry in enumerate(lists):
        entry = [int(x) for x in entry]
        n = entry[0] if entry else -1
        if n < 0 or len(entry) != 1 + 2 * n:
            raise ConversionError(f"{path}: sample {i}: label list {entry[:9]} has {len(entry)} "
                                  f"entries, expected 1+2N = {1 + 2 * max(n, 0)} for N = {n}")
        ids, vals = tuple(entry[1::2]), entry[2::2]
        if first is None:
            first = ids
            values = np.zeros((len(lists), n), dtype=_value_dtype(max_value))
        elif ids != first:
            what = f"N = {n}" if n != len(first) else f"parameter ids {list(ids)}"
            raise ConversionError(f"{path}: sample {i}: {what}, but sample 0 has N = {len(first)} "
                                  f"with parameter ids {list(first)} (mixed N across samples)")
        bad = [] if max_value is None else [v for v in vals if not 0 <= v <= max_value]
        if bad:
            raise ConversionError(f"{path}: sample {i}: quantized values must be 0..{max_value}, found {bad}")
        values[i] = vals
    return first or (), values


def stat_key(path: Path) -> tuple[str, int, int]:
    """A cache key that changes when the file does."""
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector. Unpickling one list per sample otherwise sets off
    collections whose cost grows with every object in the process: a 0.06 s load of 60k
    samples took up to 0.29 s in a process holding many objects. Cycles, if any, are
    collected later."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_pickle(path: Path, what: str = "VIMH", encoding: str = "latin1") -> object:
    """Unpickle a source file; a truncated or corrupt file is a ConversionError calling it a
    ``what`` pickle. Python 2 strings become ``str`` (latin-1, so numpy arrays load) or,
    with ``encoding="bytes"``, ``bytes``: half the work for a large array, which then
    skips a decode and re-encode. The file is mapped, not read, so its bytes are copied
    once, into the objects."""
    try:
        with open(path, "rb") as f, _gc_paused():
            if os.fstat(f.fileno()).st_size == 0:
                raise EOFError("the file is empty")
            try:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError:  # a file system that cannot map files: read it
                return pickle.load(f, encoding=encoding)  # source files are the user's own data
            with mapped:
                return pickle.loads(mapped, encoding=encoding)
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise ConversionError(f"{path}: expected a {what} pickle, found a truncated or corrupt "
                              f"file ({type(e).__name__}: {e})") from e


def load_pickle(path: Path, kind: PickleKind = VIMH_PICKLE) -> VimhSplit:
    return _load_pickle(stat_key(path), kind)


@latest_per_file(lambda key, kind: (key[0], kind))
def _load_pickle(key: tuple[str, int, int], kind: PickleKind) -> VimhSplit:
    path, labels_key = Path(key[0]), kind.label_keys[0]
    batch = read_pickle(path, kind.what)
    if not isinstance(batch, dict) or "data" not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ConversionError(f"{path}: expected a dict with 'data' and {labels_key!r}, found {found}")
    labels = next((batch[k] for k in kind.label_keys if k in batch), None)
    if labels is None:
        raise ConversionError(f"{path}: expected {labels_key!r}, found keys {sorted(batch)}")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2:
        raise ConversionError(f"{path}: 'data' expected uint8 of shape (n, H*W*C), "
                              f"found {data.dtype} of shape {data.shape}")
    if len(labels) != len(data):
        raise ConversionError(f"{path}: 'data' has {len(data)} rows but {labels_key!r} has "
                              f"{len(labels)} entries")
    ids, values = parse_label_lists(path, labels, kind.max_value)
    dims = tuple(int(batch[k]) for k in ("height", "width", "channels")) if all(
        k in batch for k in ("height", "width", "channels")) else None
    scales = batch.get("scale_factors")
    return VimhSplit(path, "pickle", dims, ids, values,  # type: ignore[arg-type]
                     None if scales is None else np.asarray(scales, dtype=np.float32), data)


def load_binary(path: Path, header_hint: int | None) -> VimhSplit:
    return _load_binary(stat_key(path), header_hint)


@latest_per_file(lambda key, hint: (key[0], hint))
def _load_binary(key: tuple[str, int, int], header_hint: int | None) -> VimhSplit:
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
    return VimhSplit(path, variant, dims, ids, values, scales, records[:, pixels_at:])


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
