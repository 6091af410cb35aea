"""``write_shards``: any samples into a shard set, with everything the converters guarantee.

A sample is an image (a uint8 array, or encoded JPEG/PNG bytes) plus a class per head and,
optionally, a real value per quantized head. Samples are checked as they come (image shape
or codec against the schema's image spec, every head present and in range), gathered into
blocks and written by the same block encoder and :class:`~shard_tools.writer.ShardWriter`
the converters use: atomic (staged, manifest last), deterministic (the same samples in the
same order give the same bytes), resumable (``resume=``). See ``docs/own-data.md``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import ConversionError, ShardFormatError, quoted
from pipeline.format.labels import LabelEncoder
from pipeline.format.manifest import Manifest
from pipeline.format.schema import QUANTIZATION_LEVELS, DatasetSchema, Head, ImageSpec
from pipeline.format.tar_read import member_key
from shard_tools.conversion.blocks import encode_block
from shard_tools.formats.base import BLOCK_BYTES, SampleBlock
from shard_tools.progress_bar import ProgressBar
from shard_tools.writer import DEFAULT_MAX_BYTES, DEFAULT_MAX_SAMPLES, ShardWriter

BLOCK_SAMPLES = 1024  # samples gathered into one block at most
JPEG_QUALITY = 90  # of images given as arrays for a jpg schema
_MODES = {1: ("L",), 3: ("RGB",), 4: ("RGBA", "CMYK")}
_MAGIC = {"jpg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}


@dataclass(frozen=True)
class Sample:
    """One sample for :func:`write_shards`: ``image`` (a uint8 array in the schema's layout,
    HxW for one channel; or JPEG/PNG bytes for a jpg/png schema), ``labels`` (head name to
    class index; a quantized head may give ``values`` instead, or both), ``values`` (head
    name to real value, quantized heads only) and an optional ``key``."""

    image: np.ndarray | bytes
    labels: Mapping[str, int] = field(default_factory=dict)
    values: Mapping[str, float] = field(default_factory=dict)
    key: str | None = None


def _as_sample(item: Sample | Mapping[str, Any], index: int) -> Sample:
    if isinstance(item, Sample):
        return item
    if isinstance(item, Mapping) and "image" in item:
        unknown = sorted(set(item) - {"image", "labels", "values", "key"})
        if not unknown:
            return Sample(item["image"], item.get("labels") or {}, item.get("values") or {}, item.get("key"))
    raise ConversionError(f"sample {index}: expected a Sample or a mapping with image, labels, values, key; found "
                          f"{quoted(item)}")


class _LabelValues:
    """A sample's raw label value per head: the class, or a quantized head's byte ``q``."""

    def __init__(self, schema: DatasetSchema) -> None:
        self.heads = schema.heads
        self.central = {h.name: self._central_q(h) for h in schema.heads if h.kind == "quantized"}

    @staticmethod
    def _central_q(head: Head) -> list[int]:
        """For each class of a quantized head, the byte whose real value is nearest its centre."""
        best: dict[int, int] = {}
        for q in range(QUANTIZATION_LEVELS):
            c = head.class_of_quantized(q)
            centre = head.min + c * (head.step or 0) if head.step else head.real_value(c)  # type: ignore[operator]
            if c not in best or abs(head.real_value(q) - centre) < abs(head.real_value(best[c]) - centre):
                best[c] = q
        return [best.get(c, -1) for c in range(head.num_classes)]

    def row(self, sample: Sample, where: str) -> list[int]:
        unknown = sorted((set(sample.labels) | set(sample.values)) - {h.name for h in self.heads})
        if unknown:
            raise ConversionError(f"{where}: heads {unknown} are not in the schema {[h.name for h in self.heads]}")
        return [self._raw(head, sample, where) for head in self.heads]

    def _raw(self, head: Head, sample: Sample, where: str) -> int:
        cls, value = sample.labels.get(head.name), sample.values.get(head.name)
        if value is not None and head.kind != "quantized":
            raise ConversionError(f"{where}: head {head.name!r} is a class head; give its class, not a value")
        if head.kind == "quantized" and value is not None:
            return self._q_of_value(head, value, cls, where)
        is_int = isinstance(cls, int | np.integer) and not isinstance(cls, bool)
        if cls is None or not is_int or not 0 <= int(cls) < head.num_classes:
            raise ConversionError(f"{where}: head {head.name!r}: expected a class in 0..{head.num_classes - 1}, "
                                  f"found {quoted(cls)}")
        if head.kind != "quantized":
            return int(cls)
        q = self.central[head.name][int(cls)]
        if q < 0:
            raise ConversionError(f"{where}: head {head.name!r}: class {cls} has no quantized value; give a value")
        return q

    @staticmethod
    def _q_of_value(head: Head, value: float, cls: int | None, where: str) -> int:
        lo, hi = head.min, head.max
        if not isinstance(value, (int, float)) or not lo <= value <= hi:  # type: ignore[operator]
            raise ConversionError(f"{where}: head {head.name!r}: value expected in {lo}..{hi}, found {quoted(value)}")
        q = round((value - lo) / (hi - lo) * (QUANTIZATION_LEVELS - 1))  # type: ignore[operator]
        if cls is not None and head.class_of_quantized(q) != cls:
            raise ConversionError(f"{where}: head {head.name!r}: value {value} is class {head.class_of_quantized(q)}, "
                                  f"not the class {cls} given")
        return q


def _raw_pixels(spec: ImageSpec, image: Any, where: str) -> bytes:
    array = np.asarray(image)
    channels, height, width = spec.shape_chw
    shapes = {"CHW": (channels, height, width), "HWC": (height, width, channels)}
    expected = shapes[spec.layout]
    if channels == 1 and array.shape == (height, width):
        array = array.reshape(expected)
    if array.dtype != np.uint8 or array.shape != expected:
        raise ConversionError(f"{where}: image expected a uint8 array of shape {expected} ({spec.describe()}), "
                              f"found {array.dtype} {array.shape}")
    return np.ascontiguousarray(array).tobytes()


def _encoded(spec: ImageSpec, image: Any, where: str) -> bytes:
    """The image as the schema's codec stores it: bytes checked (codec, size, channels), or an
    array encoded (JPEG quality 90, or PNG)."""
    if isinstance(image, np.ndarray):
        array = image if image.ndim == 3 else image[:, :, None]
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != spec.channels:
            raise ConversionError(f"{where}: image expected a uint8 HxWx{spec.channels} array, found "
                                  f"{array.dtype} {image.shape}")
        out = io.BytesIO()
        Image.fromarray(array[:, :, 0] if spec.channels == 1 else array).save(
            out, format="JPEG" if spec.encoding == "jpg" else "PNG", **({"quality": JPEG_QUALITY}
                                                                      if spec.encoding == "jpg" else {}))
        image = out.getvalue()
    if not isinstance(image, bytes) or not image.startswith(_MAGIC[spec.encoding]):
        raise ConversionError(f"{where}: image expected {spec.encoding.upper()} bytes or a uint8 array, found "
                              f"{quoted(image[:16] if isinstance(image, bytes) else type(image).__name__)}")
    _check_encoded(spec, image, where)
    return image


def _check_encoded(spec: ImageSpec, data: bytes, where: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            mode, (width, height) = opened.mode, opened.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ConversionError(f"{where}: image does not open as {spec.encoding.upper()} ({e})") from e
    if mode not in _MODES.get(spec.channels, ()):
        raise ConversionError(f"{where}: image expected {spec.channels} channel(s), found mode {mode}")
    if spec.fixed_size and (height, width) != (spec.height, spec.width):
        raise ConversionError(f"{where}: image expected {spec.height}x{spec.width}, found {height}x{width}")


class _Blocks:
    """Samples checked and gathered into blocks of about ``BLOCK_BYTES`` of images."""

    def __init__(self, schema: DatasetSchema) -> None:
        self.schema, self.labels = schema, _LabelValues(schema)
        self.keys: set[str] = set()

    def of(self, samples: Iterable[Sample | Mapping[str, Any]], start: int) -> Iterator[tuple[SampleBlock, list[str]]]:
        """Blocks of the samples, numbered from ``start``, and their keys."""
        images: list[bytes] = []
        rows: list[list[int]] = []
        keys: list[str] = []
        first = start
        for index, item in enumerate(samples, start):
            sample = _as_sample(item, index)
            where = f"sample {index}" + (f" ({sample.key})" if sample.key is not None else "")
            keys.append(self._key(sample, index, where))
            spec = self.schema.image
            images.append(_raw_pixels(spec, sample.image, where) if spec.encoding == "raw"
                          else _encoded(spec, sample.image, where))
            rows.append(self.labels.row(sample, where))
            if len(keys) >= BLOCK_SAMPLES or sum(map(len, images)) >= BLOCK_BYTES:
                yield self._block(images, rows, first), keys
                images, rows, keys, first = [], [], [], index + 1
        if keys:
            yield self._block(images, rows, first), keys

    def _key(self, sample: Sample, index: int, where: str) -> str:
        key = f"{index:08d}" if sample.key is None else sample.key
        try:
            member_key(f"{key}.raw", where)
        except ShardFormatError as e:
            raise ConversionError(f"{where}: key {quoted(key)}: expected 1-128 characters of A-Z a-z 0-9 _ -") from e
        if key in self.keys:
            raise ConversionError(f"{where}: key {key!r} given twice; keys must be unique in a split")
        self.keys.add(key)
        return key

    def _block(self, images: list[bytes], rows: list[list[int]], first: int) -> SampleBlock:
        n = len(images)
        pixels: np.ndarray | list[bytes] = images
        if self.schema.image.encoding == "raw":
            pixels = np.frombuffer(b"".join(images), np.uint8).reshape(n, -1)
        return SampleBlock(indices=np.arange(first, first + n, dtype=np.int64), images=pixels,
                           labels=np.asarray(rows, dtype=np.int64).reshape(n, len(self.schema.heads)))


def write_shards(samples: Iterable[Sample | Mapping[str, Any]], out: str | Path, schema: DatasetSchema, *,
                 max_samples: int | None = DEFAULT_MAX_SAMPLES, max_bytes: int | None = DEFAULT_MAX_BYTES,
                 resume: str | None = None) -> Manifest:
    """Write ``samples`` as the split ``schema.split`` of a shard set under ``out``
    (``out/<split>/``, manifest last) and return its manifest. ``resume``: a string that
    names this input (a version, a hash of its file list): an interrupted run with the same
    string, schema and limits keeps its finished shards, and the samples they hold are
    skipped (``samples`` must then give the same samples in the same order)."""
    key = None if resume is None else hashlib.sha256(
        f"{schema.to_json()}\0{resume}\0{(max_samples, max_bytes)}".encode()).hexdigest()
    writer = ShardWriter(Path(out) / schema.split, schema, max_samples=max_samples, max_bytes=max_bytes,
                         resume_key=key)
    encoder, blocks = LabelEncoder(schema), _Blocks(schema)
    with writer, ProgressBar(desc=f"{schema.name}/{schema.split}", unit="sample", disable=None, leave=False) as bar:
        done = sum(s.samples for s in writer.shards)
        stream = iter(samples)
        for _ in zip(range(done), stream, strict=False):  # kept by a resumed run: skipped, not encoded
            pass
        for block, keys in blocks.of(stream, done):
            writer.write_block(*encode_block(schema, encoder, block, "write_shards", keys)[:3])
            bar.update(len(keys))
    if writer.manifest is None:
        raise ConversionError(f"{out}: no samples were written")
    return writer.manifest
