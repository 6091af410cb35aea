"""The shared conversion driver: source format → shuffled blocks of samples → one writer per
split. Checks, label records and tar members are built a block at a time with numpy."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.errors import ConversionError
from pipeline.label_columns import label_columns
from pipeline.labels import LabelEncoder
from pipeline.manifest import Manifest
from pipeline.schema import QUANTIZATION_LEVELS, DatasetSchema
from shard_tools.converters import SampleBlock, SourceFormat, get_format
from shard_tools.writer import DEFAULT_MAX_BYTES, DEFAULT_MAX_SAMPLES, Rows, ShardWriter

log = logging.getLogger(__name__)


def sample_order(n: int, *, shuffle: bool, seed: int) -> list[int]:
    """Source indices in write order: a seeded permutation, or source order."""
    if not shuffle:
        return list(range(n))
    return [int(i) for i in np.random.default_rng(seed).permutation(n).tolist()]


def sample_key(index: int) -> str:
    """A sample's key: its index in the source split, so every key traces back to it."""
    return f"{index:08d}"


def sample_keys(indices: np.ndarray) -> list[str]:
    """:func:`sample_key` of each index."""
    return [f"{index:08d}" for index in indices.tolist()]


def image_sizes(block: SampleBlock) -> np.ndarray:
    """The byte size of each image of a block."""
    if isinstance(block.images, np.ndarray):
        return np.full(len(block), block.images.shape[1], dtype=np.int64)
    return np.fromiter((len(image) for image in block.images), dtype=np.int64, count=len(block))


def check_shapes(schema: DatasetSchema, block: SampleBlock, where: str) -> None:
    """Raise ConversionError when a block's columns do not line up (a converter bug)."""
    n, images, labels = len(block), block.images, block.labels
    if (len(images) != n or (isinstance(images, np.ndarray) and images.ndim != 2)
            or labels.shape != (n, len(schema.heads)) or labels.dtype.kind not in "iu"):
        raise ConversionError(f"{where}: a block of {n} samples has {len(images)} images and "
                              f"{labels.dtype} labels of shape {labels.shape}; expected {n} images "
                              f"and integer labels of shape ({n}, {len(schema.heads)})")


def check_block(schema: DatasetSchema, block: SampleBlock, where: str) -> None:
    """Raise ConversionError, naming the first bad sample, when a block does not fit its schema."""
    check_shapes(schema, block, where)
    heads, sizes = schema.heads, image_sizes(block)
    ok = np.ones((len(block), 1 + len(heads)), dtype=bool)
    if schema.image.encoding == "raw":
        ok[:, 0] = sizes == schema.image.nbytes
    limits = [QUANTIZATION_LEVELS if head.kind == "quantized" else head.num_classes for head in heads]
    for j, limit in enumerate(limits):
        ok[:, j + 1] = (block.labels[:, j] >= 0) & (block.labels[:, j] < limit)
    if ok.all():
        return
    row = int(np.flatnonzero(~ok.all(axis=1))[0])
    col, index = int(np.flatnonzero(~ok[row])[0]), int(block.indices[row])
    if col == 0:
        raise ConversionError(f"{where}: sample {index}: image has {int(sizes[row])} bytes, "
                              f"expected H*W*C = {schema.image.nbytes} ({schema.image.describe()})")
    raise ConversionError(f"{where}: sample {index}: head {heads[col - 1].name!r} expected a value "
                          f"in 0..{limits[col - 1] - 1}, found {int(block.labels[row, col - 1])!r}")


def stage_split(fmt: SourceFormat, src: Path, split: str, out: Path, *, shuffle: bool = True,
                seed: int = 0, max_samples: int | None = DEFAULT_MAX_SAMPLES,
                max_bytes: int | None = DEFAULT_MAX_BYTES) -> ShardWriter:
    """Write one split of ``src`` into staging under ``out/<split>/``; publish it later."""
    schema = fmt.read_schema(src, split)
    order = sample_order(fmt.count_samples(src, split), shuffle=shuffle, seed=seed)
    ext = schema.image.encoding
    writer = ShardWriter(out / split, schema, max_samples=max_samples, max_bytes=max_bytes,
                         publish_on_exit=False)
    encoder = LabelEncoder(schema)
    with writer, tqdm(total=len(order), desc=f"{schema.name}/{split}", unit="sample",
                      disable=None, leave=False) as bar:
        for block in fmt.iter_blocks(src, split, order):
            check_block(schema, block, f"{src} ({split})")
            images = Rows(block.images) if isinstance(block.images, np.ndarray) else block.images
            labels = Rows(*encoder.encode(block.labels, block.extra))
            writer.write_block(sample_keys(block.indices), [(ext, images), ("labels.msgpack", labels)],
                               label_columns(schema, block.labels))
            bar.update(len(block))
    return writer


def convert(format_name: str, src: str | Path, out: str | Path, *,
            splits: Sequence[str] | None = None, shuffle: bool = True, seed: int = 0,
            max_samples: int | None = DEFAULT_MAX_SAMPLES,
            max_bytes: int | None = DEFAULT_MAX_BYTES,
            options: Mapping[str, Any] | None = None) -> dict[str, Manifest]:
    """Convert every split (or the named ones) of a source dataset into shards under ``out``.
    ``options`` configure the source format (see :class:`SourceFormat`; most take none).

    All splits are staged first and published together: a run that fails on any split
    publishes nothing and leaves earlier output as it was."""
    fmt, src, out = get_format(format_name, options), Path(src), Path(out)
    wanted = tuple(splits) if splits else fmt.splits(src)
    for split in wanted:
        fmt.read_schema(src, split)  # fail on inconsistent input before writing anything
    staged: list[ShardWriter] = []
    try:
        for split in wanted:
            staged.append(stage_split(fmt, src, split, out, shuffle=shuffle, seed=seed,
                                      max_samples=max_samples, max_bytes=max_bytes))
    except BaseException:
        for writer in staged:
            writer.abort()
        raise
    return {writer.schema.split: writer.publish() for writer in staged}
