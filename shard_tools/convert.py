"""The shared conversion driver: source format → shuffled samples → one writer per split."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.errors import ConversionError
from pipeline.labels import EXTRA_KEY, encode_labels, label_record
from pipeline.manifest import Manifest
from pipeline.schema import QUANTIZATION_LEVELS, DatasetSchema
from shard_tools.converters import SourceFormat, SourceSample, get_format
from shard_tools.writer import DEFAULT_MAX_BYTES, DEFAULT_MAX_SAMPLES, ShardWriter

log = logging.getLogger(__name__)


def sample_order(n: int, *, shuffle: bool, seed: int) -> list[int]:
    """Source indices in write order: a seeded permutation, or source order."""
    if not shuffle:
        return list(range(n))
    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


def sample_key(index: int) -> str:
    """A sample's key: its index in the source split, so every key traces back to it."""
    return f"{index:08d}"


def check_sample(schema: DatasetSchema, sample: SourceSample, where: str) -> None:
    """Raise ConversionError when a source sample does not fit its schema."""
    image = schema.image
    if image.encoding == "raw" and len(sample.image) != image.nbytes:
        raise ConversionError(f"{where}: sample {sample.index}: image has {len(sample.image)} "
                              f"bytes, expected H*W*C = {image.nbytes} ({image.describe()})")
    for head in schema.heads:
        value = sample.labels.get(head.name)
        limit = QUANTIZATION_LEVELS if head.kind == "quantized" else head.num_classes
        if value is None or not 0 <= value < limit:
            raise ConversionError(f"{where}: sample {sample.index}: head {head.name!r} expected "
                                  f"a value in 0..{limit - 1}, found {value!r}")


def stage_split(fmt: SourceFormat, src: Path, split: str, out: Path, *, shuffle: bool = True,
                seed: int = 0, max_samples: int | None = DEFAULT_MAX_SAMPLES,
                max_bytes: int | None = DEFAULT_MAX_BYTES) -> ShardWriter:
    """Write one split of ``src`` into staging under ``out/<split>/``; publish it later."""
    schema = fmt.read_schema(src, split)
    order = sample_order(fmt.count_samples(src, split), shuffle=shuffle, seed=seed)
    ext = schema.image.encoding
    writer = ShardWriter(out / split, schema, max_samples=max_samples, max_bytes=max_bytes,
                         publish_on_exit=False)
    with writer, tqdm(total=len(order), desc=f"{schema.name}/{split}", unit="sample",
                      disable=None, leave=False) as bar:
        for sample in fmt.iter_samples(src, split, order):
            check_sample(schema, sample, f"{src} ({split})")
            record = label_record(schema, sample.labels)
            if sample.extra:
                record[EXTRA_KEY] = dict(sample.extra)
            writer.write(sample_key(sample.index), [(ext, sample.image),
                                                    ("labels.msgpack", encode_labels(record))])
            bar.update()
    return writer


def convert(format_name: str, src: str | Path, out: str | Path, *,
            splits: Sequence[str] | None = None, shuffle: bool = True, seed: int = 0,
            max_samples: int | None = DEFAULT_MAX_SAMPLES,
            max_bytes: int | None = DEFAULT_MAX_BYTES) -> dict[str, Manifest]:
    """Convert every split (or the named ones) of a source dataset into shards under ``out``.

    All splits are staged first and published together: a run that fails on any split
    publishes nothing and leaves earlier output as it was."""
    fmt, src, out = get_format(format_name), Path(src), Path(out)
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
