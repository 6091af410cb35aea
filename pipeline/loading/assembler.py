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

from pipeline.errors import ShardFormatError
from pipeline.format.schema import DatasetSchema
from pipeline.loading.decode_spec import NDRAWS, draw_key, sample_uniforms
from pipeline.loading.decoded import BatchRefs, DecodedShard, by_shard, value_key
from pipeline.loading.hand_off import HandOffBuffers
from pipeline.loading.images import BadImage, InputImages, gather_pixels
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
    their labels already in ``schema``): each input's images as it stores them, or decoded at
    the size its ``DecodeSpec`` says; each input's own transform, then ``transform``.
    Random crops and flips draw from ``(seed, epoch)`` and the sample's place in the rank's
    epoch. Picklable, so it travels to dataloader workers."""

    def __init__(self, schema: DatasetSchema, inputs: Sequence[ShardInput], *, transform: Transform | None = None,
                 on_error: str = "raise", seed: int = 0, buffers: HandOffBuffers | None = None) -> None:
        self.schema, self.transform, self.on_error, self.seed = schema, transform, on_error, seed
        self.buffers = buffers or HandOffBuffers(0, 0)
        self.images = InputImages(inputs)
        self.input_transforms = tuple(put.transform for put in inputs)
        self._per_input = any(t is not None for t in self.input_transforms)
        self._transforms = transform is not None or self._per_input
        self._draws = any(spec is not None and spec.needs_draws for spec in self.images.decode)
        self.errors = ErrorCounter()

    def __call__(self, group: Sequence[BatchRefs], with_keys: bool = False,
                 draws: tuple[int, Sequence[int]] = (0, ())) -> PackedGroup:
        """Consecutive batches packed into one buffer (in shared memory inside a dataloader
        worker, reused once the main process is done with it, so they cross to the main
        process in one hand-off, without another copy).
        ``draws``: the epoch and, per batch, the place of its first sample in the rank's
        epoch (what random crops and flips are drawn from)."""
        epoch, starts = draws
        key = draw_key(self.seed, epoch) if self._draws else None
        uniforms = [self._uniforms(key, starts[b] if b < len(starts) else 0, len(refs))
                    for b, refs in enumerate(group)]
        batches = [self._known_sound(by_shard(refs)) for refs in group]
        made = [self._transformed(refs, u) for refs, u in zip(batches, uniforms, strict=True)] \
            if self._transforms else [(refs, None) for refs in batches]
        fields = [self._fields(len(refs), images) for refs, images in made]
        sizes = [packed_size(f) for f in fields]
        buffer, slot = self.buffers.take(sum(sizes))
        parts, offset, assembled = [], 0, []
        for (refs, images), u, batch_fields, size in zip(made, uniforms, fields, sizes, strict=True):
            views = field_views(buffer[offset:offset + size], batch_fields)
            refs = self._fill(refs, images, u, views)
            keys = [refs.shards[k].index.keys[i] for k, i in zip(refs.which.tolist(), refs.where.tolist(),
                                                                   strict=True)] if with_keys else []
            parts.append((offset, size, batch_fields, keys))
            assembled.append(refs)
            offset += size
        return PackedGroup(buffer, parts, self._input_counts(assembled), slot)

    @staticmethod
    def _uniforms(key: np.ndarray | None, start: int, n: int) -> np.ndarray:
        return sample_uniforms(key, start, n) if key is not None else np.zeros((n, NDRAWS))

    def _input_counts(self, batches: list[BatchRefs]) -> np.ndarray:
        """Samples per input in ``batches`` as assembled (after replacements)."""
        counts = np.zeros(len(self.images.stored), dtype=np.int64)
        for refs in batches:
            for shard, _, rows in refs.groups():
                counts[shard.source] += len(rows)
        return counts

    def _fill(self, refs: BatchRefs, images: torch.Tensor | None, u: np.ndarray,
              views: dict[str, torch.Tensor]) -> BatchRefs:
        """Images and labels into a batch's views; the refs as filled (a sample whose image
        did not decode replaced by another of the batch)."""
        if images is not None:
            views[IMAGES].copy_(images)
        elif self.images.raw_only():
            gather_pixels(refs, self.schema.image, views[IMAGES].numpy().reshape(len(refs), -1))
        else:
            refs = self._decoded_into(refs, u, views[IMAGES])
        self._fill_labels(refs, views)
        return refs

    def _decoded_into(self, refs: BatchRefs, u: np.ndarray, out: torch.Tensor) -> BatchRefs:
        """Each sample's image decoded straight into its slot of ``out``; a slot whose image
        does not decode takes a copy of a good one (skip), or the batch fails (raise)."""
        bad, slots = [], out.numpy()
        for j, (k, i) in enumerate(zip(refs.which.tolist(), refs.where.tolist(), strict=True)):
            try:
                self.images.into(refs.shards[k], i, u[j], slots[j])
            except BadImage as e:
                self._fail(refs.shards[k], i, str(e))
                bad.append(j)
        if not bad:
            return refs
        pick = self._replacements(refs, bad)
        for j in bad:
            out[j].copy_(out[int(pick[j])])
        return BatchRefs(refs.shards, refs.which[pick], refs.where[pick])

    def _replacements(self, refs: BatchRefs, bad: list[int]) -> np.ndarray:
        """For each slot, the slot whose sample fills it: itself, or for a bad one another,
        good one of the batch (so the batch keeps its size)."""
        good = [j for j in range(len(refs)) if j not in set(bad)]
        if not good:
            raise ShardFormatError(f"{refs.shards[0].index.url}: every sample of a batch is bad "
                                   f"(last: {self.errors.examples[-1]})")
        pick = np.arange(len(refs))
        for n, j in enumerate(bad):
            pick[j] = good[n % len(good)]
        return pick

    def _fields(self, n: int, images: torch.Tensor | None) -> tuple[Field, ...]:
        """The images, then every head's classes as one (heads, n) block and the quantized
        heads' values as another, so labels are filled with one gather per shard."""
        image_field: Field = (IMAGES, str(images.dtype).removeprefix("torch."), tuple(images.shape)) \
            if images is not None else (IMAGES, "uint8", (n, *self._shape()))
        heads = self.schema.heads
        fields: list[Field] = [image_field, ((CLASSES, tuple(h.name for h in heads)), "int64", (len(heads), n))]
        quantized = tuple(value_key(h.name) for h in heads if h.kind == "quantized")
        if quantized:
            fields.append(((VALUES, quantized), "float32", (len(quantized), n)))
        return tuple(fields)

    def _shape(self) -> tuple[int, int, int]:
        shape = self.images.output_shape()
        if shape is None:
            raise ShardFormatError(f"{self.schema.name}: the inputs' images come out in different shapes; give a "
                                   "transform (or decode specs) that makes them one size")
        return shape

    def _fail(self, shard: DecodedShard, i: int, reason: str) -> None:
        message = f"{shard.index.url}: {shard.index.keys[i]}.{reason}"
        if self.on_error == "raise":
            raise ShardFormatError(message)
        self.errors.add(message)

    def _known_sound(self, refs: BatchRefs) -> BatchRefs:
        """The batch with samples already known to be bad (found when their shard was
        decoded: labels, missing members) replaced by good ones of it, or an error."""
        if all(not shard.problems for shard in refs.shards):
            return refs
        bad = []
        for j, (k, i) in enumerate(zip(refs.which.tolist(), refs.where.tolist(), strict=True)):
            reason = refs.shards[k].problems.get(i)
            if reason is not None:
                self._fail(refs.shards[k], i, reason)
                bad.append(j)
        if not bad:
            return refs
        pick = self._replacements(refs, bad)
        return BatchRefs(refs.shards, refs.which[pick], refs.where[pick])

    def _transformed(self, refs: BatchRefs, u: np.ndarray) -> tuple[BatchRefs, torch.Tensor]:
        """The batch's images as one tensor, through each input's transform and then the
        loader's, where given."""
        refs, images = self._sample_images(refs, u)
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
        return refs, torch.stack(images)

    def _sample_images(self, refs: BatchRefs, u: np.ndarray) -> tuple[BatchRefs, list[torch.Tensor]]:
        """Each sample's image as a tensor (raw pixels of one spec: one gather for all); a
        sample whose image does not decode replaced as in :meth:`_decoded_into`."""
        spec = self.schema.image
        if self.images.raw_only() and spec.fixed_size:
            flat = np.empty((len(refs), spec.nbytes), dtype=np.uint8)
            gather_pixels(refs, spec, flat)
            return refs, list(torch.from_numpy(flat).view(len(refs), *spec.shape_chw).unbind(0))
        images: list[torch.Tensor | None] = []
        bad = []
        for j, (k, i) in enumerate(zip(refs.which.tolist(), refs.where.tolist(), strict=True)):
            try:
                images.append(self.images.sample(refs.shards[k], i, u[j]))
            except BadImage as e:
                self._fail(refs.shards[k], i, str(e))
                images.append(None)
                bad.append(j)
        if bad:
            pick = self._replacements(refs, bad)
            images = [images[int(p)] for p in pick]
            refs = BatchRefs(refs.shards, refs.which[pick], refs.where[pick])
        return refs, [image for image in images if image is not None]

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
