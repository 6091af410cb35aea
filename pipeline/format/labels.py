"""Label members: every head's class index and, for quantized heads, the byte and real value.

A label member is a msgpack map ``{head_name: {"class": int}}`` for class heads and
``{head_name: {"class": int, "q": int, "value": float}}`` for quantized heads.
:func:`label_record` and :func:`encode_labels` build one member; :class:`LabelEncoder`
builds the same bytes for many samples at once (the converter's path).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

import msgpack
import numpy as np

from pipeline.errors import ConversionError, ShardFormatError
from pipeline.format.schema import QUANTIZATION_LEVELS, DatasetSchema, Head

LabelRecord = dict[str, dict[str, Any]]
EXTRA_KEY = "_extra"  # optional per-sample source metadata (e.g. VIMH scale factors)
PaddedRows = tuple[np.ndarray, np.ndarray]  # (n, width) uint8, row i's bytes [:lengths[i]], then zeros
MAX_TABLE = 1 << 16  # heads with more raw values than this are encoded per block, not tabled


def label_record(schema: DatasetSchema, raw: Mapping[str, int]) -> LabelRecord:
    """Full label record from raw per-head values (class index, or quantized byte ``q``)."""
    return {head.name: head_entry(head, raw[head.name]) for head in schema.heads}


def head_entry(head: Head, value: int) -> dict[str, Any]:
    """One head's entry of a label record, from its raw value (shared; do not mutate)."""
    return quantized_entries(head)[value] if head.kind == "quantized" else {"class": value}


@functools.lru_cache(maxsize=256)
def quantized_entries(head: Head) -> tuple[dict[str, Any], ...]:
    """The label entry of every quantized byte of ``head`` (shared; do not mutate)."""
    return tuple({"class": head.class_of_quantized(q), "q": q, "value": head.real_value(q)}
                 for q in range(QUANTIZATION_LEVELS))


def encode_labels(record: LabelRecord) -> bytes:
    packed: bytes = msgpack.packb(record, use_bin_type=True)
    return packed


def _packed(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _map_header(n: int) -> bytes:
    header: bytes = msgpack.Packer().pack_map_header(n)
    return header


def _array_header(n: int) -> bytes:
    header: bytes = msgpack.Packer().pack_array_header(n)
    return header


def _table(entries: Sequence[bytes]) -> PaddedRows:
    """Byte strings as zero-padded rows of one uint8 array, plus their lengths."""
    lengths = np.array([len(e) for e in entries], dtype=np.int64)
    width = int(lengths.max(initial=0))
    rows = np.array(entries, dtype=f"S{max(width, 1)}").view(np.uint8)
    return rows.reshape(len(entries), max(width, 1))[:, :width], lengths


def _constant(data: bytes, n: int) -> PaddedRows:
    rows = np.broadcast_to(np.frombuffer(data, np.uint8), (n, len(data)))
    return rows, np.full(n, len(data), dtype=np.int64)


class _HeadTable:
    """The msgpack bytes of one head's name and entry, for each raw value."""

    def __init__(self, head: Head) -> None:
        self.head = head
        self.prefix = _packed(head.name)
        limit = QUANTIZATION_LEVELS if head.kind == "quantized" else head.num_classes
        self.table = self._build(range(limit)) if limit <= MAX_TABLE else None

    def _build(self, values: Sequence[int]) -> PaddedRows:
        return _table([self.prefix + _packed(head_entry(self.head, v)) for v in values])

    def lookup(self, values: np.ndarray) -> PaddedRows:
        """Entries of ``values`` (already checked to be in range)."""
        if self.table is not None:
            rows, lengths = self.table
            return rows[values], lengths[values]
        unique, inverse = np.unique(values, return_inverse=True)
        rows, lengths = self._build(unique.tolist())
        return rows[inverse], lengths[inverse]


def _extra_rows(extra: Mapping[str, np.ndarray], n: int) -> PaddedRows:
    """``"_extra": {name: number or [numbers]}`` with every number a float64, packed as
    msgpack packs a Python float (``0xcb`` and 8 big-endian bytes); one width for all rows."""
    parts = [np.frombuffer(_packed(EXTRA_KEY) + _map_header(len(extra)), np.uint8)]
    for name, column in extra.items():
        floats = np.ascontiguousarray(column, dtype=">f8")
        if floats.ndim not in (1, 2) or len(floats) != n:
            raise ConversionError(f"_extra {name!r}: expected shape (n,) or (n, k) with n = {n}, "
                                  f"found {floats.shape}")
        count = 1 if floats.ndim == 1 else floats.shape[1]
        parts.append(np.frombuffer(_packed(name) + (_array_header(count) if floats.ndim == 2 else b""),
                                   np.uint8))
        packed = np.empty((n, count, 9), dtype=np.uint8)
        packed[:, :, 0] = 0xCB
        packed[:, :, 1:] = floats.reshape(n, count, 1).view(np.uint8)
        parts.append(packed.reshape(n, 9 * count))
    rows = np.concatenate([np.broadcast_to(p, (n, len(p))) if p.ndim == 1 else p for p in parts], axis=1)
    return rows, np.full(n, rows.shape[1], dtype=np.int64)


def _concat(parts: Sequence[PaddedRows], n: int) -> PaddedRows:
    """Row-wise concatenation of padded rows (each part starts where the previous ends)."""
    out = np.zeros((n, sum(rows.shape[1] for rows, _ in parts)), dtype=np.uint8)
    flat, ends = out.reshape(-1), np.arange(n, dtype=np.int64) * out.shape[1]
    for rows, lengths in parts:
        if rows.shape[1]:
            flat[ends[:, None] + np.arange(rows.shape[1])] = rows
        ends = ends + lengths
    return out, ends - np.arange(n, dtype=np.int64) * out.shape[1]


class LabelEncoder:
    """Label members of many samples at once, byte for byte what :func:`encode_labels` makes
    of :func:`label_record` plus ``_extra`` (tested). Each head has a table of the msgpack
    bytes of its name and entry for every raw value, so a record is a map header followed
    by one table row per head."""

    def __init__(self, schema: DatasetSchema) -> None:
        self.schema = schema
        self._heads = [_HeadTable(head) for head in schema.heads]

    def encode(self, values: np.ndarray, extra: Mapping[str, np.ndarray] | None = None) -> PaddedRows:
        """Records of ``len(values)`` samples: ``values[i, j]`` is sample ``i``'s raw value of
        head ``j`` (schema order, in range); each ``extra`` column, shape ``(n,)`` or ``(n, k)``,
        becomes ``_extra[name]``: a float or a list of ``k`` floats. Returns ``(rows,
        lengths)``: record ``i`` is ``rows[i, :lengths[i]]``, followed by zeros."""
        n = len(values)
        parts = [_constant(_map_header(len(self._heads) + bool(extra)), n)]
        parts += [table.lookup(values[:, j]) for j, table in enumerate(self._heads)]
        if extra:
            parts.append(_extra_rows(extra, n))
        return _concat(parts, n)


def decode_labels(data: bytes, where: str = "label member") -> LabelRecord:
    try:
        record = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.UnpackException, ValueError) as e:
        raise ShardFormatError(f"{where}: expected a msgpack map, found undecodable bytes ({e})") from e
    if not isinstance(record, dict):
        raise ShardFormatError(f"{where}: expected a msgpack map, found {type(record).__name__}")
    return record


def label_problems(schema: DatasetSchema, record: Mapping[str, Any]) -> list[str]:
    """Every way ``record`` breaks the schema (empty when sound)."""
    problems = [f"unknown head {name!r}" for name in record
                if name not in schema.head_names and name != EXTRA_KEY]
    for head in schema.heads:
        entry = record.get(head.name)
        if not isinstance(entry, Mapping):
            problems.append(f"head {head.name!r}: expected a map with 'class', found {entry!r}")
            continue
        problems.extend(_head_problems(head, entry))
    return problems


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _head_problems(head: Head, entry: Mapping[str, Any]) -> list[str]:
    cls = entry.get("class")
    if not _is_int(cls) or not 0 <= cls < head.num_classes:
        return [f"head {head.name!r}: class expected in 0..{head.num_classes - 1}, found {cls!r}"]
    if head.kind != "quantized":
        return []
    q, value = entry.get("q"), entry.get("value")
    if not _is_int(q) or not 0 <= q < QUANTIZATION_LEVELS:
        return [f"head {head.name!r}: q expected in 0..{QUANTIZATION_LEVELS - 1}, found {q!r}"]
    problems = []
    if head.class_of_quantized(q) != cls:
        problems.append(f"head {head.name!r}: class expected {head.class_of_quantized(q)} "
                        f"for q={q}, found {cls}")
    expected = head.real_value(q)
    if not isinstance(value, (int, float)) or not math.isclose(value, expected, rel_tol=1e-9,
                                                                abs_tol=1e-9):
        problems.append(f"head {head.name!r}: value expected {expected!r} for q={q} "
                        f"(range {head.min}..{head.max}), found {value!r}")
    return problems
