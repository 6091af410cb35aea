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

from pipeline.errors import quoted
from pipeline.format.label_columns import LABELS_MEMBER, decode_label_columns
from pipeline.format.schema import DatasetSchema, Head
from pipeline.format.shard_index import ShardIndex

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


_VALUE_TOLERANCE = 1e-6  # of a quantized head's range: float32 rounding of its ends


@dataclass(frozen=True)
class _HeadCheck:
    """What a label of one head may be: a class in ``0..classes-1`` and, for a quantized
    head, a finite real value in ``[low, high]`` (give or take float32 rounding)."""

    name: str
    classes: int
    quantized: bool
    low: float = 0.0
    high: float = 0.0

    @classmethod
    def of(cls, head: Head) -> _HeadCheck:
        if head.kind != "quantized" or head.min is None or head.max is None:
            return cls(head.name, head.num_classes, False)
        slack = (head.max - head.min) * _VALUE_TOLERANCE
        return cls(head.name, head.num_classes, True, head.min - slack, head.max + slack)

    def problem(self, cls: object, value: object) -> str | None:
        """Why one sample's label breaks this head (None when it is sound)."""
        if type(cls) is not int or not 0 <= cls < self.classes:
            return f"head {self.name!r}: class expected an int in 0..{self.classes - 1}, found {quoted(cls)}"
        if self.quantized and (type(value) not in (int, float) or not self.low <= value <= self.high):  # type: ignore[operator]
            return (f"head {self.name!r}: value expected a number in {self.low:.6g}..{self.high:.6g}, found "
                    f"{quoted(value)}")
        return None

    def column_problems(self, classes: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        """Which samples of a shard's label columns break this head."""
        bad = (classes < 0) | (classes >= self.classes)
        if self.quantized and values is not None:
            bad |= ~((values >= self.low) & (values <= self.high))  # NaN is out of range too
        return bad


def _label_columns(index: ShardIndex, schema: DatasetSchema,
                   problems: dict[int, str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every sample's class (and value) per head; unreadable labels, and labels of the wrong
    type or out of their head's range, are noted in ``problems`` (class -1, value NaN)."""
    n, data = len(index), index.data
    offsets, sizes = index.offsets.get(LABELS_EXT), index.sizes.get(LABELS_EXT)
    if offsets is None or sizes is None:
        offsets = sizes = np.full(n, -1, dtype=np.int64)
    heads = [_HeadCheck.of(h) for h in schema.heads]
    classes: dict[str, list[int]] = {h.name: [] for h in heads}
    values: dict[str, list[float]] = {h.name: [] for h in heads if h.quantized}
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


def _record_row(data: bytes, start: int, size: int,
                heads: list[_HeadCheck]) -> tuple[list[tuple[int, float | None]], None] | tuple[None, str]:
    """One label member as ``(class, value)`` per head, or why it cannot be."""
    if start < 0:
        return None, f"{LABELS_EXT}: missing label member"
    try:
        record = msgpack.unpackb(data[start:start + size])
        row = [(record[h.name]["class"], record[h.name].get("value") if h.quantized else None) for h in heads]
    except (msgpack.UnpackException, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{LABELS_EXT}: labels do not decode to every head's class ({quoted(e)})"
    for head, (cls, value) in zip(heads, row, strict=True):
        problem = head.problem(cls, value)
        if problem is not None:
            return None, f"{LABELS_EXT}: {problem}"
    return row, None


def _append_labels(data: bytes, start: int, size: int, heads: list[_HeadCheck],
                   classes: dict[str, list[int]], values: dict[str, list[float]]) -> str | None:
    """Append one sample's labels to the columns (-1 / NaN when unsound, with the reason)."""
    row, reason = _record_row(data, start, size, heads)
    for head, (cls, value) in zip(heads, row or [(-1, np.nan)] * len(heads), strict=True):
        classes[head.name].append(cls)
        if head.quantized:
            values[head.name].append(np.nan if value is None else value)
    return reason


def _column_problems(schema: DatasetSchema, classes: dict[str, np.ndarray], values: dict[str, np.ndarray],
                     problems: dict[int, str]) -> None:
    """Note every sample whose ``__labels__`` columns break a head (first reason kept)."""
    for head in schema.heads:
        check = _HeadCheck.of(head)
        bad = check.column_problems(classes[head.name], values.get(head.name))
        for i in np.flatnonzero(bad).tolist():
            value = float(values[head.name][i]) if head.name in values else None
            reason = check.problem(int(classes[head.name][i]), value) or "label out of range"
            problems.setdefault(i, f"{LABELS_MEMBER}: {reason}")


def decode_shard(index: ShardIndex, schema: DatasetSchema, source: int = 0) -> DecodedShard:
    """Labels of every sample as columns, and every missing or misshapen member noted."""
    spec, n = schema.image, len(index)
    problems: dict[int, str] = {}
    if index.labels_member is not None:  # the shard's label columns; label members must still be there
        start, size = index.labels_member
        classes, values = decode_label_columns(index.data[start:start + size], schema, n, index.url)
        _column_problems(schema, classes, values, problems)
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


def gather_rows(shard: DecodedShard, rows: np.ndarray, size: int) -> np.ndarray:
    """Raw pixels of ``rows`` (each ``size`` bytes) from a shard without a uniform layout."""
    offsets, view = shard.index.offsets["raw"], memoryview(shard.index.data)
    joined = b"".join(view[o:o + size] for o in offsets[rows].tolist())
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(rows), size)
