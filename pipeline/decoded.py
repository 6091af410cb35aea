"""A shard as the assembler uses it: its index, every head's labels as columns, the
reasons its bad samples are bad (:class:`DecodedShard`), and a batch as references into
shards (:class:`BatchRefs`). Labels are decoded once per shard, so a batch's labels are a
gather of rows."""

from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass, field

import msgpack
import numpy as np

from pipeline.label_columns import decode_label_columns
from pipeline.schema import DatasetSchema
from pipeline.tario import ShardIndex
from pipeline.union import MISSING_CLASS, HeadMap

LABELS_EXT = "labels.msgpack"


def value_key(head: str) -> str:
    """The label key of a quantized head's real values."""
    return f"{head}.value"


@dataclass
class DecodedShard:
    """A shard's index plus its labels as per-head columns and the reasons samples are bad."""

    index: ShardIndex
    classes: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    problems: dict[int, str] = field(default_factory=dict)
    pixels: np.ndarray | None = None  # (n, nbytes) view, for uniformly laid out raw shards
    source: int = 0  # which source of a mix the shard belongs to
    label_matrices: tuple[np.ndarray, np.ndarray] | None = None  # made by the assembler on first use


def _label_columns(index: ShardIndex, schema: DatasetSchema,
                   problems: dict[int, str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every sample's class (and value) per head; unreadable labels are noted in ``problems``."""
    n, data = len(index), index.data
    offsets, sizes = index.offsets.get(LABELS_EXT), index.sizes.get(LABELS_EXT)
    if offsets is None or sizes is None:
        offsets = sizes = np.full(n, -1, dtype=np.int64)
    heads = [(h.name, h.kind == "quantized") for h in schema.heads]
    classes: dict[str, list[int]] = {name: [] for name, _ in heads}
    values: dict[str, list[float]] = {name: [] for name, quantized in heads if quantized}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # tens of thousands of short-lived dicts: no cycles to find, only time to lose
    try:
        for i, (start, size) in enumerate(zip(offsets.tolist(), sizes.tolist(), strict=True)):
            problem = _append_labels(data, start, size, heads, classes, values)
            if problem is not None:
                problems[i] = problem
    finally:
        if gc_was_enabled:
            gc.enable()
    return ({k: np.asarray(v, dtype=np.int64) for k, v in classes.items()},
            {k: np.asarray(v, dtype=np.float32) for k, v in values.items()})


def _append_labels(data: bytes, start: int, size: int, heads: list[tuple[str, bool]],
                   classes: dict[str, list[int]], values: dict[str, list[float]]) -> str | None:
    """Append one sample's labels to the columns (-1 / NaN when unreadable, with the reason)."""
    if start < 0:
        reason = f"{LABELS_EXT}: missing label member"
    else:
        try:
            record = msgpack.unpackb(data[start:start + size])
            row = [(name, record[name]["class"], record[name].get("value", np.nan) if quantized else None)
                   for name, quantized in heads]
        except (msgpack.UnpackException, ValueError, KeyError, TypeError, AttributeError) as e:
            reason = f"{LABELS_EXT}: labels do not decode to every head's class ({e!r})"
        else:
            for name, cls, value in row:
                classes[name].append(cls)
                if value is not None:
                    values[name].append(value)
            return None
    for name, quantized in heads:
        classes[name].append(-1)
        if quantized:
            values[name].append(np.nan)
    return reason


def decode_shard(index: ShardIndex, schema: DatasetSchema, source: int = 0) -> DecodedShard:
    """Labels of every sample as columns, and every missing or misshapen member noted."""
    spec, n = schema.image, len(index)
    problems: dict[int, str] = {}
    if index.labels_member is not None:  # the shard's label columns; label members must still be there
        start, size = index.labels_member
        classes, values = decode_label_columns(index.data[start:start + size], schema, n, index.url)
        members = index.offsets.get(LABELS_EXT, np.full(n, -1, dtype=np.int64))
        problems.update({i: f"{LABELS_EXT}: missing label member" for i in np.flatnonzero(members < 0).tolist()})
    else:
        classes, values = _label_columns(index, schema, problems)
    offsets = index.offsets.get(spec.encoding, np.full(n, -1, dtype=np.int64))
    sizes = index.sizes.get(spec.encoding, np.full(n, -1, dtype=np.int64))
    for i in np.flatnonzero(offsets < 0).tolist():
        problems.setdefault(i, f"{spec.encoding}: missing image member")
    pixels = None
    if spec.encoding == "raw":
        for i in np.flatnonzero((offsets >= 0) & (sizes != spec.nbytes)).tolist():
            problems.setdefault(i, f"raw: raw image expected {spec.nbytes} bytes ({spec.describe()}), "
                                   f"found {int(sizes[i])}")
        if index.stride is not None and n and not problems:
            pixels = np.lib.stride_tricks.as_strided(
                np.frombuffer(index.data, np.uint8, offset=int(offsets[0])), shape=(n, spec.nbytes),
                strides=(index.stride, 1), writeable=False)
    return DecodedShard(index, classes, values, problems, pixels, source)


@dataclass
class BatchRefs:
    """The samples of one batch: ``shards[which[j]]``, sample ``where[j]``, for j in order."""

    shards: list[DecodedShard]
    which: np.ndarray
    where: np.ndarray
    _groups: list[tuple[DecodedShard, slice, np.ndarray]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.where)

    def groups(self) -> list[tuple[DecodedShard, slice, np.ndarray]]:
        """(shard, batch positions, sample positions) for each run of samples from one shard
        (one run per shard once :func:`by_shard` has grouped the batch)."""
        if self._groups is None:
            which = self.which
            cuts = np.flatnonzero(which[1:] != which[:-1]) + 1
            bounds = [0, *cuts.tolist(), len(which)]
            self._groups = [(self.shards[int(which[a])], slice(a, b), self.where[a:b])
                            for a, b in itertools.pairwise(bounds)]
        return self._groups


def by_shard(refs: BatchRefs) -> BatchRefs:
    """The batch's samples grouped by shard (stable within a shard), so each shard's samples
    are gathered as one contiguous block. The batch holds the same samples; only their
    order within it changes, the same way every time."""
    if len(refs.shards) == 1:
        return refs
    order = np.argsort(refs.which, kind="stable")
    return BatchRefs(refs.shards, refs.which[order], refs.where[order])


def to_union(shard: DecodedShard, union: DatasetSchema, head_map: HeadMap) -> DecodedShard:
    """A mix's shard with its label columns renamed into the union schema: heads its source
    lacks are the missing marker (class -1, value NaN), the dataset head is the source."""
    n, k = len(shard.index), shard.source
    classes: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    for head in union.heads:
        own = head_map.heads[head.name][k]
        if head.name == head_map.dataset_head:
            classes[head.name] = np.full(n, k, dtype=np.int64)
        else:
            classes[head.name] = shard.classes[own] if own is not None else np.full(n, MISSING_CLASS, dtype=np.int64)
        if head.kind == "quantized":
            values[head.name] = shard.values[own] if own is not None else np.full(n, np.nan, dtype=np.float32)
    return DecodedShard(shard.index, classes, values, shard.problems, shard.pixels, k)


def gather_rows(shard: DecodedShard, rows: np.ndarray, size: int) -> np.ndarray:
    """Raw pixels of ``rows`` (each ``size`` bytes) from a shard without a uniform layout."""
    offsets, view = shard.index.offsets["raw"], memoryview(shard.index.data)
    joined = b"".join(view[o:o + size] for o in offsets[rows].tolist())
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(rows), size)
