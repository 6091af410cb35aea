"""Turning samples into batches: ``(images [B,C,H,W] uint8, labels {head: tensor})``.

Work per sample is done once per shard, with array operations where it can be: a shard's
labels are decoded into per-head columns when it is loaded (:class:`DecodedShard`), and
a batch is a gather of rows. Raw pixels from uniformly laid out shards are gathered as
rows of a strided view of the shard, with no per-sample call at all. PNG/JPEG members
are decoded with torchvision.io (libjpeg-turbo / libpng; measured faster than Pillow
here). Labels are ``labels[head]`` (int64 class index) and, for quantized heads,
``labels[head + ".value"]`` (float32 real value).
"""

from __future__ import annotations

import functools
import gc
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_image

from pipeline.errors import ShardFormatError
from pipeline.label_columns import decode_label_columns
from pipeline.schema import DatasetSchema
from pipeline.tario import ShardIndex
from pipeline.union import MISSING_CLASS, HeadMap

log = logging.getLogger(__name__)

LABELS_EXT = "labels.msgpack"
ERROR_POLICIES = ("raise", "skip")
Transform = Callable[[torch.Tensor], torch.Tensor]


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


IMAGES = "images"
CLASSES, VALUES = "\0classes", "\0values"  # the label blocks' names inside a buffer
# name, torch dtype name, shape; a label block's name is (block name, row names): one row per head
Field = tuple["str | tuple[str, tuple[str, ...]]", str, tuple[int, ...]]


@dataclass
class PackedGroup:
    """Consecutive batches in one uint8 buffer: per batch ``(offset, size, fields, keys)``
    (see :func:`unpack`). One buffer crosses from a worker to the main process per group."""

    buffer: torch.Tensor
    parts: list[tuple[int, int, tuple[Field, ...], list[str]]]
    source_counts: np.ndarray | None = None  # a mix: samples per source in these batches

    def pin_memory(self) -> PackedGroup:
        """The group in page-locked memory (``DataLoader(pin_memory=True)`` calls this)."""
        return PackedGroup(self.buffer.pin_memory(), self.parts, self.source_counts)

    def batches(self) -> list[tuple[dict[str, torch.Tensor], list[str]]]:
        """Each batch's fields as typed views, with its keys."""
        return [(unpack(self.buffer[offset:offset + size], fields), keys) for offset, size, fields, keys in self.parts]


@functools.lru_cache(maxsize=256)
def _field_sizes(fields: tuple[Field, ...]) -> list[tuple[int, int]]:
    """(offset, nbytes) of each field, each starting 8-byte aligned."""
    spans, offset = [], 0
    for _, dtype, shape in fields:
        nbytes = math.prod(shape) * getattr(torch, dtype).itemsize
        spans.append((offset, nbytes))
        offset += -(-nbytes // 8) * 8
    return spans


def packed_size(fields: tuple[Field, ...]) -> int:
    """Bytes a batch with these fields takes in a buffer (a multiple of 8)."""
    spans = _field_sizes(fields)
    total = spans[-1][0] + spans[-1][1] if spans else 0
    return -(-total // 8) * 8


def _views(buffer: torch.Tensor, fields: tuple[Field, ...]) -> dict[str, torch.Tensor]:
    """Typed views of a packed buffer's fields (label blocks whole, by block name)."""
    out = {}
    for (name, dtype, shape), (offset, nbytes) in zip(fields, _field_sizes(fields), strict=True):
        out[name if isinstance(name, str) else name[0]] = \
            buffer[offset:offset + nbytes].view(getattr(torch, dtype)).view(shape)
    return out


def unpack(buffer: torch.Tensor, fields: tuple[Field, ...]) -> dict[str, torch.Tensor]:
    """Typed views of a packed buffer's fields; each label block's rows by head name."""
    out = {}
    for (name, dtype, shape), (offset, nbytes) in zip(fields, _field_sizes(fields), strict=True):
        view = buffer[offset:offset + nbytes].view(getattr(torch, dtype)).view(shape)
        if isinstance(name, str):
            out[name] = view
        else:
            out.update(zip(name[1], view.unbind(0), strict=True))
    return out


@dataclass
class ErrorCounter:
    """Bad samples seen by one worker, with the first few reasons kept for the log."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(reason)


class BatchAssembler:
    """Builds batches for one schema; picklable, so it travels to dataloader workers.

    For a mix, ``inputs`` are the sources' own schemas (by ``DecodedShard.source``) and
    ``head_map`` says which source head fills each head of ``schema`` (the union)."""

    def __init__(self, schema: DatasetSchema, *, transform: Transform | None = None,
                 on_error: str = "raise", inputs: Sequence[DatasetSchema] | None = None,
                 head_map: HeadMap | None = None) -> None:
        if on_error not in ERROR_POLICIES:
            raise ShardFormatError(f"on_error: expected one of {ERROR_POLICIES}, found {on_error!r}")
        self.schema, self.transform, self.on_error = schema, transform, on_error
        self.inputs, self.head_map = tuple(inputs or (schema,)), head_map
        self.errors = ErrorCounter()
        self._mode = ImageReadMode.GRAY if schema.image.channels == 1 else ImageReadMode.RGB

    def __call__(self, group: Sequence[BatchRefs], with_keys: bool = False) -> PackedGroup:
        """Consecutive batches packed into one buffer (in shared memory inside a dataloader
        worker, so they cross to the main process in one hand-off, without another copy)."""
        prepared = []
        for refs in group:
            refs, decoded = self._sound(by_shard(refs))
            keys = [refs.shards[k].index.keys[i] for k, i in zip(refs.which.tolist(), refs.where.tolist(),
                                                                   strict=True)] if with_keys else []
            images = None if self.transform is None else self._images(refs, decoded)
            prepared.append((refs, decoded, keys, images, self._fields(len(refs), images)))
        sizes = [packed_size(p[4]) for p in prepared]
        buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        if get_worker_info() is not None:
            buffer.share_memory_()
        parts, offset = [], 0
        for (refs, decoded, keys, images, fields), size in zip(prepared, sizes, strict=True):
            self._fill(refs, decoded, images, _views(buffer[offset:offset + size], fields))
            parts.append((offset, size, fields, keys))
            offset += size
        return PackedGroup(buffer, parts, self._source_counts([p[0] for p in prepared]))

    def _source_counts(self, batches: list[BatchRefs]) -> np.ndarray | None:
        """Samples per source of a mix in ``batches`` as assembled (after replacements)."""
        if self.head_map is None:
            return None
        counts = np.zeros(len(self.inputs), dtype=np.int64)
        for refs in batches:
            for shard, _, rows in refs.groups():
                counts[shard.source] += len(rows)
        return counts

    def _fill(self, refs: BatchRefs, decoded: dict[int, torch.Tensor], images: torch.Tensor | None,
              views: dict[str, torch.Tensor]) -> None:
        if images is not None:
            views[IMAGES].copy_(images)
        elif self.schema.image.encoding == "raw":
            self._gather_pixels(refs, views[IMAGES].numpy().reshape(len(refs), -1))
        else:  # each decoded image straight into its slot: one copy, no stack
            for j, slot in enumerate(views[IMAGES].unbind(0)):
                slot.copy_(decoded[j])
        self._fill_labels(refs, views)

    def _fields(self, n: int, images: torch.Tensor | None) -> tuple[Field, ...]:
        """The images, then every head's classes as one (heads, n) block and the quantized
        heads' values as another, so labels are filled with one gather per shard."""
        spec = self.schema.image
        image_field = (IMAGES, "uint8", (n, *spec.shape_chw)) if images is None else \
            (IMAGES, str(images.dtype).removeprefix("torch."), tuple(images.shape))
        heads = self.schema.heads
        fields: list[Field] = [image_field, ((CLASSES, tuple(h.name for h in heads)), "int64", (len(heads), n))]
        quantized = tuple(value_key(h.name) for h in heads if h.kind == "quantized")
        if quantized:
            fields.append(((VALUES, quantized), "float32", (len(quantized), n)))
        return tuple(fields)

    def _fail(self, shard: DecodedShard, i: int, reason: str) -> None:
        message = f"{shard.index.url}: {shard.index.keys[i]}.{reason}"
        if self.on_error == "raise":
            raise ShardFormatError(message)
        self.errors.add(message)

    def _sound(self, refs: BatchRefs) -> tuple[BatchRefs, dict[int, torch.Tensor]]:
        """The batch with bad samples replaced by good ones of the same batch (or an error),
        and the decoded images of encoded formats by batch position."""
        if all(not shard.problems and self.inputs[shard.source].image.encoding == "raw" for shard in refs.shards):
            return refs, {}  # nothing to decode, nothing known to be bad
        bad: list[int] = []
        decoded: dict[int, torch.Tensor] = {}
        for j, (k, i) in enumerate(zip(refs.which.tolist(), refs.where.tolist(), strict=True)):
            shard = refs.shards[k]
            reason = shard.problems.get(i)
            if reason is None and self.inputs[shard.source].image.encoding != "raw":
                image, reason = self._decode(shard, i)
                decoded[j] = image  # type: ignore[assignment]
            if reason is not None:
                self._fail(shard, i, reason)
                bad.append(j)
        if not bad:
            return refs, decoded
        good = [j for j in range(len(refs)) if j not in set(bad)]
        if not good:
            raise ShardFormatError(f"{refs.shards[0].index.url}: every sample of a batch is bad "
                                   f"(last: {self.errors.examples[-1]})")
        pick = np.asarray([good[j % len(good)] for j in range(len(refs))])  # keep the batch size exact
        remapped = {n: decoded[j] for n, j in enumerate(pick.tolist()) if j in decoded}
        return BatchRefs(refs.shards, refs.which[pick], refs.where[pick]), remapped

    def _decode(self, shard: DecodedShard, i: int) -> tuple[torch.Tensor | None, str | None]:
        spec = self.inputs[shard.source].image
        data = shard.index.member(spec.encoding, i)
        try:
            image = decode_image(torch.frombuffer(bytearray(data or b""), dtype=torch.uint8), mode=self._mode)
        except (RuntimeError, ValueError) as e:
            return None, f"{spec.encoding}: image does not decode ({e})"
        if (tuple(image.shape) if spec.fixed_size else image.shape[0]) != \
                (spec.shape_chw if spec.fixed_size else spec.channels):
            expected = spec.shape_chw if spec.fixed_size else f"{spec.channels} channels"
            return None, f"{spec.encoding}: image expected CxHxW {expected}, found {tuple(image.shape)}"
        return image, None

    def _gather_pixels(self, refs: BatchRefs, out: np.ndarray) -> None:
        """Raw pixels of the batch into ``out`` (n, nbytes), stored as CHW."""
        spec = self.schema.image
        for shard, at, rows in refs.groups():
            out[at] = shard.pixels[rows] if shard.pixels is not None else _gather(shard, rows, spec.nbytes)
        if spec.layout == "HWC":
            channels, height, width = spec.shape_chw
            hwc = out.reshape(len(refs), height, width, channels)
            out[:] = hwc.transpose(0, 3, 1, 2).reshape(len(refs), -1)

    def _images(self, refs: BatchRefs, decoded: dict[int, torch.Tensor]) -> torch.Tensor:
        """The batch's images as one tensor, through the per-sample transform if any."""
        spec = self.schema.image
        if spec.encoding == "raw" and spec.fixed_size:
            flat = np.empty((len(refs), spec.nbytes), dtype=np.uint8)
            self._gather_pixels(refs, flat)
            images = list(torch.from_numpy(flat).view(len(refs), *spec.shape_chw).unbind(0))
        else:
            images = [decoded[j] if j in decoded else self._raw_image(refs, j) for j in range(len(refs))]
        if self.transform is not None:
            images = [self.transform(image) for image in images]
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) > 1:
            raise ShardFormatError(f"{refs.shards[0].index.url}: a batch's images have {len(shapes)} different "
                                   f"shapes {sorted(shapes)[:4]}; the transform must give every image one size")
        return torch.stack(images)

    def _raw_image(self, refs: BatchRefs, j: int) -> torch.Tensor:
        """Sample ``j``'s raw pixels as CHW, by its own source's image spec (mixes)."""
        shard, i = refs.shards[int(refs.which[j])], int(refs.where[j])
        spec = self.inputs[shard.source].image
        pixels = torch.frombuffer(bytearray(_gather(shard, np.asarray([i]), spec.nbytes)), dtype=torch.uint8)
        if spec.layout == "HWC":
            return pixels.view(spec.height, spec.width, spec.channels).permute(2, 0, 1)  # type: ignore[arg-type]
        return pixels.view(spec.shape_chw)

    def _fill_labels(self, refs: BatchRefs, views: dict[str, torch.Tensor]) -> None:
        """Every head's classes (and values) of the batch: one gather per shard and block."""
        classes = views[CLASSES].numpy()
        values = views[VALUES].numpy() if VALUES in views else None
        for shard, at, rows in refs.groups():
            shard_classes, shard_values = self._label_matrices(shard)
            classes[:, at] = shard_classes[:, rows]
            if values is not None:
                values[:, at] = shard_values[:, rows]

    def _label_matrices(self, shard: DecodedShard) -> tuple[np.ndarray, np.ndarray]:
        """A shard's labels as (heads, n) classes and (quantized heads, n) values, made once."""
        if shard.label_matrices is None:
            heads = self.schema.heads
            classes = np.stack([shard.classes[h.name] for h in heads]).astype(np.int64, copy=False)
            quantized = [shard.values[h.name] for h in heads if h.kind == "quantized"]
            values = (np.stack(quantized).astype(np.float32, copy=False) if quantized
                      else np.empty((0, len(shard.index)), dtype=np.float32))
            shard.label_matrices = (classes, values)
        return shard.label_matrices

    def log_errors(self, where: str) -> None:
        if self.errors.count:
            log.warning("%s: skipped %d bad sample(s) (replaced within their batch); first: %s",
                        where, self.errors.count, "; ".join(self.errors.examples))


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


def _gather(shard: DecodedShard, rows: np.ndarray, size: int) -> np.ndarray:
    """Raw pixels of ``rows`` (each ``size`` bytes) from a shard without a uniform layout."""
    offsets, view = shard.index.offsets["raw"], memoryview(shard.index.data)
    joined = b"".join(view[o:o + size] for o in offsets[rows].tolist())
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(rows), size)
