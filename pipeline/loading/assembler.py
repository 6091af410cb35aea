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

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_image

from pipeline.errors import ShardFormatError
from pipeline.format.schema import DatasetSchema
from pipeline.loading.decoded import BatchRefs, DecodedShard, by_shard, gather_rows, value_key
from pipeline.loading.inputs import ShardInput, Transform
from pipeline.loading.packing import CLASSES, IMAGES, VALUES, Field, PackedGroup, field_views, packed_size

log = logging.getLogger(__name__)



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
    """Builds batches in ``schema`` from the shards of ``inputs`` (by ``DecodedShard.source``,
    their labels already in ``schema``); each input's own transform runs on its images, then
    ``transform``. Picklable, so it travels to dataloader workers."""

    def __init__(self, schema: DatasetSchema, inputs: Sequence[ShardInput], *, transform: Transform | None = None,
                 on_error: str = "raise") -> None:
        self.schema, self.transform, self.on_error = schema, transform, on_error
        self.images = tuple(put.schema.image for put in inputs)  # each input's stored images
        self.input_transforms = tuple(put.transform for put in inputs)
        self._per_input = any(t is not None for t in self.input_transforms)
        self._transforms = transform is not None or self._per_input
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
            images = self._images(refs, decoded) if self._transforms else None
            prepared.append((refs, decoded, keys, images, self._fields(len(refs), images)))
        sizes = [packed_size(p[4]) for p in prepared]
        buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        if get_worker_info() is not None:
            buffer.share_memory_()
        parts, offset = [], 0
        for (refs, decoded, keys, images, fields), size in zip(prepared, sizes, strict=True):
            self._fill(refs, decoded, images, field_views(buffer[offset:offset + size], fields))
            parts.append((offset, size, fields, keys))
            offset += size
        return PackedGroup(buffer, parts, self._input_counts([p[0] for p in prepared]))

    def _input_counts(self, batches: list[BatchRefs]) -> np.ndarray:
        """Samples per input in ``batches`` as assembled (after replacements)."""
        counts = np.zeros(len(self.images), dtype=np.int64)
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
        if all(not shard.problems and self.images[shard.source].encoding == "raw" for shard in refs.shards):
            return refs, {}  # nothing to decode, nothing known to be bad
        bad: list[int] = []
        decoded: dict[int, torch.Tensor] = {}
        for j, (k, i) in enumerate(zip(refs.which.tolist(), refs.where.tolist(), strict=True)):
            shard = refs.shards[k]
            reason = shard.problems.get(i)
            if reason is None and self.images[shard.source].encoding != "raw":
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
        spec = self.images[shard.source]
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
            out[at] = shard.pixels[rows] if shard.pixels is not None else gather_rows(shard, rows, spec.nbytes)
        if spec.layout == "HWC":
            channels, height, width = spec.shape_chw
            hwc = out.reshape(len(refs), height, width, channels)
            out[:] = hwc.transpose(0, 3, 1, 2).reshape(len(refs), -1)

    def _images(self, refs: BatchRefs, decoded: dict[int, torch.Tensor]) -> torch.Tensor:
        """The batch's images as one tensor, through their source's transform and the
        per-sample transform, where given."""
        spec = self.schema.image
        if spec.encoding == "raw" and spec.fixed_size:
            flat = np.empty((len(refs), spec.nbytes), dtype=np.uint8)
            self._gather_pixels(refs, flat)
            images = list(torch.from_numpy(flat).view(len(refs), *spec.shape_chw).unbind(0))
        else:
            images = [decoded[j] if j in decoded else self._raw_image(refs, j) for j in range(len(refs))]
        if self._per_input:
            sources = [refs.shards[k].source for k in refs.which.tolist()]
            images = [image if (t := self.input_transforms[k]) is None else t(image)
                      for image, k in zip(images, sources, strict=True)]
        if self.transform is not None:
            images = [self.transform(image) for image in images]
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) > 1:
            raise ShardFormatError(f"{refs.shards[0].index.url}: a batch's images have {len(shapes)} different "
                                   f"shapes {sorted(shapes)[:4]}; the transforms must give every image one size")
        return torch.stack(images)

    def _raw_image(self, refs: BatchRefs, j: int) -> torch.Tensor:
        """Sample ``j``'s raw pixels as CHW, by its own source's image spec (mixes)."""
        shard, i = refs.shards[int(refs.which[j])], int(refs.where[j])
        spec = self.images[shard.source]
        pixels = torch.frombuffer(bytearray(gather_rows(shard, np.asarray([i]), spec.nbytes)), dtype=torch.uint8)
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
