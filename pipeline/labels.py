"""Label members: every head's class index and, for quantized heads, the byte and real value.

A label member is a msgpack map ``{head_name: {"class": int}}`` for class heads and
``{head_name: {"class": int, "q": int, "value": float}}`` for quantized heads.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, TypeGuard

import msgpack

from pipeline.errors import ShardFormatError
from pipeline.schema import QUANTIZATION_LEVELS, DatasetSchema, Head

LabelRecord = dict[str, dict[str, Any]]
EXTRA_KEY = "_extra"  # optional per-sample source metadata (e.g. VIMH scale factors)


def label_record(schema: DatasetSchema, raw: Mapping[str, int]) -> LabelRecord:
    """Full label record from raw per-head values (class index, or quantized byte ``q``)."""
    record: LabelRecord = {}
    for head in schema.heads:
        value = raw[head.name]
        if head.kind == "quantized":
            record[head.name] = quantized_entries(head)[value]
        else:
            record[head.name] = {"class": value}
    return record


@functools.lru_cache(maxsize=256)
def quantized_entries(head: Head) -> tuple[dict[str, Any], ...]:
    """The label entry of every quantized byte of ``head`` (shared; do not mutate)."""
    return tuple({"class": head.class_of_quantized(q), "q": q, "value": head.real_value(q)}
                 for q in range(QUANTIZATION_LEVELS))


def encode_labels(record: LabelRecord) -> bytes:
    packed: bytes = msgpack.packb(record, use_bin_type=True)
    return packed


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
