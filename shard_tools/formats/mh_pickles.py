"""Split files in VIMH's pickle layout, which CIFAR-100-MH shares (VIMH's binary variant
is :mod:`shard_tools.formats.vimh.binary`): a dict with ``data`` (one row of planar CHW
pixels per sample) and per-sample label lists ``[n, id, value, id, value, ...]``.

Every reader gives a :class:`MultiheadSplit`: pixels, each sample's ``(param_id, value)``
pairs as one array, and optional per-sample scale factors. Valid input is parsed with
numpy, all samples at once: label lists of one length are checked as one array (a bad one
is then found by walking them, so its error names it).

Source files are hostile until checked: they are unpickled by :class:`SafeUnpickler`,
which builds only plain containers, numbers, strings and numpy arrays, so a crafted
pickle cannot run code.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConversionError
from shard_tools.formats.file_cache import latest_per_file

# the globals a pickle of dicts, lists and numpy arrays refers to (numpy 1 and 2 names)
_PLAIN = ("object", "bytes", "bytearray", "str", "int", "float", "complex", "bool", "list", "tuple", "dict", "set",
          "frozenset")
SAFE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"), ("copy_reg", "_reconstructor"),
    ("copyreg", "_reconstructor"), *((module, name) for module in ("builtins", "__builtin__") for name in _PLAIN),
})


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: any other global a pickle names (a
    function to call, a class to build) is refused, so a crafted source file cannot run
    code (``copyreg._reconstructor`` can build only classes this list allows)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a source pickle may hold only plain "
                                     "data and numpy arrays")


@dataclass(frozen=True)
class MultiheadSplit:
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
                return SafeUnpickler(f, encoding=encoding).load()
            with mapped:
                return SafeUnpickler(mapped, encoding=encoding).load()
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise ConversionError(f"{path}: expected a {what} pickle, found a truncated or corrupt "
                              f"file ({type(e).__name__}: {e})") from e


def load_pickle(path: Path, kind: PickleKind = VIMH_PICKLE) -> MultiheadSplit:
    return _load_pickle(stat_key(path), kind)


@latest_per_file(lambda key, kind: (key[0], kind))
def _load_pickle(key: tuple[str, int, int], kind: PickleKind) -> MultiheadSplit:
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
    return MultiheadSplit(path, "pickle", dims, ids, values,  # type: ignore[arg-type]
                     None if scales is None else np.asarray(scales, dtype=np.float32), data)


