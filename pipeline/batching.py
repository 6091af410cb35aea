"""Turning a list of raw samples into one batch: ``(images [B,C,H,W], labels {head: tensor})``.

Raw pixels take a fast path: the batch's image members are joined into one buffer and
viewed as a tensor, with no per-sample library call. PNG/JPEG members are decoded with
torchvision.io (libjpeg-turbo / libpng; measured faster than Pillow here). Labels come as
``labels[head]`` (int64 class index) and, for quantized heads, ``labels[head + ".value"]``
(float32 real value).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
from torchvision.io import ImageReadMode, decode_image

from pipeline.errors import ShardFormatError
from pipeline.schema import DatasetSchema
from pipeline.tario import ShardIndex

log = logging.getLogger(__name__)

LABELS_EXT = "labels.msgpack"
ERROR_POLICIES = ("raise", "skip")
Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]
SampleRef = tuple[ShardIndex, int]
Transform = Callable[[torch.Tensor], torch.Tensor]


def value_key(head: str) -> str:
    """The label key of a quantized head's real values."""
    return f"{head}.value"


@dataclass
class ErrorCounter:
    """Bad samples seen by one worker, with the first few reasons kept for the log."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(reason)


@dataclass
class _Checked:
    key: str
    record: dict[str, Any]
    image: memoryview | torch.Tensor


class BatchAssembler:
    """Builds batches for one schema; picklable, so it travels to dataloader workers."""

    def __init__(self, schema: DatasetSchema, *, transform: Transform | None = None,
                 on_error: str = "raise") -> None:
        if on_error not in ERROR_POLICIES:
            raise ShardFormatError(f"on_error: expected one of {ERROR_POLICIES}, found {on_error!r}")
        self.schema, self.transform, self.on_error = schema, transform, on_error
        self.errors = ErrorCounter()
        self._mode = ImageReadMode.GRAY if schema.image.channels == 1 else ImageReadMode.RGB

    def __call__(self, refs: Sequence[SampleRef]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        good = [checked for index, i in refs if (checked := self._checked(index, i)) is not None]
        if len(good) < len(refs):
            if not good:
                raise ShardFormatError(f"{refs[0][0].url}: every sample of a batch is bad "
                                       f"(first: {self.errors.examples[-1]})")
            good = [good[i % len(good)] for i in range(len(refs))]  # keep the batch size exact
        return self._images(good), self._labels([g.record for g in good]), [g.key for g in good]

    def _bad(self, index: ShardIndex, i: int, ext: str, reason: str) -> _Checked | None:
        """Raise, or count the bad sample and drop it (None)."""
        message = f"{index.url}: {index.keys[i]}.{ext}: {reason}"
        if self.on_error == "raise":
            raise ShardFormatError(message)
        self.errors.add(message)
        return None

    def _checked(self, index: ShardIndex, i: int) -> _Checked | None:
        """Sample ``i`` with its label record (and decoded image) if sound, else None (or raise)."""
        spec = self.schema.image
        image: memoryview | torch.Tensor | None = index.member(spec.encoding, i)
        if image is None:
            return self._bad(index, i, spec.encoding, "missing image member")
        if spec.encoding == "raw" and len(image) != spec.nbytes:
            return self._bad(index, i, "raw", f"raw image expected {spec.nbytes} bytes "
                                              f"({spec.describe()}), found {len(image)}")
        labels = index.member(LABELS_EXT, i)
        if labels is None:
            return self._bad(index, i, LABELS_EXT, "missing label member")
        try:
            record = msgpack.unpackb(labels)
            for head in self.schema.heads:
                record[head.name]["class"]  # presence check
        except (msgpack.UnpackException, ValueError, KeyError, TypeError) as e:
            return self._bad(index, i, LABELS_EXT, f"labels do not decode to every head's class ({e!r})")
        if spec.encoding != "raw":
            try:
                image = self._decode(image)  # type: ignore[arg-type]
            except (RuntimeError, ValueError) as e:
                return self._bad(index, i, spec.encoding, f"image does not decode ({e})")
        return _Checked(index.keys[i], record, image)

    def _decode(self, data: memoryview) -> torch.Tensor:
        spec = self.schema.image
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=self._mode)
        if tuple(image.shape) != spec.shape_chw:
            raise ValueError(f"expected CxHxW {spec.shape_chw}, found {tuple(image.shape)}")
        return image

    def _images(self, samples: Sequence[_Checked]) -> torch.Tensor:
        spec = self.schema.image
        if spec.encoding == "raw":
            joined = torch.frombuffer(bytearray().join(s.image for s in samples),  # type: ignore[misc]
                                      dtype=torch.uint8)
            if spec.layout == "CHW":
                batch = joined.view(len(samples), *spec.shape_chw)
            else:
                batch = joined.view(len(samples), spec.height, spec.width, spec.channels).permute(0, 3, 1, 2)
            if self.transform is None:
                return batch.contiguous()
            images = list(batch.unbind(0))
        else:
            images = [s.image for s in samples]  # type: ignore[misc]
        if self.transform is not None:
            images = [self.transform(image) for image in images]
        return torch.stack(images)

    def _labels(self, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels: dict[str, torch.Tensor] = {}
        for head in self.schema.heads:
            entries = [r[head.name] for r in records]
            labels[head.name] = torch.tensor([e["class"] for e in entries], dtype=torch.int64)
            if head.kind == "quantized":
                labels[value_key(head.name)] = torch.tensor([e.get("value", float("nan")) for e in entries],
                                                            dtype=torch.float32)
        return labels

    def log_errors(self, where: str) -> None:
        if self.errors.count:
            log.warning("%s: skipped %d bad sample(s) (replaced within their batch); first: %s",
                        where, self.errors.count, "; ".join(self.errors.examples))
