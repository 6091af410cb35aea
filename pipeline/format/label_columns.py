"""The optional ``__labels__`` member: a shard's labels again, as one column per head.

Written last in a shard (after every sample), it lets a reader get every label of the
shard from one msgpack map instead of one per sample. It never replaces the per-sample
label members, which stay the reference; the validator checks that the two agree.

Payload: ``{"count": n, "classes": {head: int32 LE bytes}, "values": {head: float32 LE bytes}}``
(``values`` for quantized heads only; the real values rounded to float32).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import msgpack
import numpy as np

from pipeline.errors import ShardFormatError
from pipeline.format.schema import QUANTIZATION_LEVELS, DatasetSchema, Head

LABELS_MEMBER = "__labels__"
Columns = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def label_columns(schema: DatasetSchema, raw: np.ndarray) -> Columns:
    """Per-head classes and real values from raw values (``raw[i, j]``: sample ``i``'s class
    index, or quantized byte, of head ``j`` in schema order)."""
    classes, values = {}, {}
    for j, head in enumerate(schema.heads):
        column = raw[:, j].astype(np.int64)
        if head.kind == "quantized":
            class_table, value_table = _quantized_tables(head)
            classes[head.name], values[head.name] = class_table[column], value_table[column]
        else:
            classes[head.name] = column
    return classes, values


@functools.lru_cache(maxsize=256)
def _quantized_tables(head: Head) -> tuple[np.ndarray, np.ndarray]:
    """Class and float32 real value of every quantized byte of ``head``."""
    levels = range(QUANTIZATION_LEVELS)
    return (np.array([head.class_of_quantized(q) for q in levels], np.int64),
            np.array([head.real_value(q) for q in levels], np.float32))


def encode_label_columns(classes: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray]) -> bytes:
    """The ``__labels__`` payload of one shard."""
    count = len(next(iter(classes.values()))) if classes else 0
    packed: bytes = msgpack.packb({"count": count,
                                   "classes": {k: np.asarray(v, "<i4").tobytes() for k, v in classes.items()},
                                   "values": {k: np.asarray(v, "<f4").tobytes() for k, v in values.items()}},
                                  use_bin_type=True)
    return packed


def decode_label_columns(data: bytes, schema: DatasetSchema, count: int, where: str) -> Columns:
    """Per-head int64 classes and float32 values; the payload must cover ``count`` samples."""
    try:
        payload = msgpack.unpackb(data)
        classes = {h.name: np.frombuffer(payload["classes"][h.name], "<i4").astype(np.int64) for h in schema.heads}
        values = {h.name: np.frombuffer(payload["values"][h.name], "<f4").astype(np.float32)
                  for h in schema.heads if h.kind == "quantized"}
    except (msgpack.UnpackException, ValueError, KeyError, TypeError) as e:
        raise ShardFormatError(f"{where}: {LABELS_MEMBER}: expected label columns for every head ({e!r})") from e
    arrays: list[np.ndarray] = [*classes.values(), *values.values()]
    lengths = {len(a) for a in arrays} | {payload.get("count")}
    if lengths != {count}:
        raise ShardFormatError(f"{where}: {LABELS_MEMBER}: expected columns of {count} samples, "
                               f"found {sorted(lengths, key=str)}")
    return classes, values
