"""The shared conversion driver: source format → shuffled blocks of samples → one writer per
split. Checks, label records and tar members are built a block at a time with numpy."""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConversionError
from pipeline.label_columns import Columns, label_columns
from pipeline.labels import LabelEncoder
from pipeline.lifetime import DieWithParent
from pipeline.manifest import Manifest
from pipeline.schema import QUANTIZATION_LEVELS, DatasetSchema
from pipeline.tario import index_shard
from shard_tools.converters import SampleBlock, get_format
from shard_tools.progress_bar import ProgressBar
from shard_tools.remote_out import convert_remote, is_remote_output
from shard_tools.staging import LOCK, conversion_lock, resume_key, source_fingerprint
from shard_tools.tar_format import Member, Rows
from shard_tools.writer import DEFAULT_MAX_BYTES, DEFAULT_MAX_SAMPLES, ShardWriter

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


Prepared = tuple[list[str], list[tuple[str, Member]], Columns, int]  # keys, members, labels, indices covered


@dataclass(frozen=True)
class Source:
    """What a worker process needs to read a split (picklable)."""

    format_name: str
    options: Mapping[str, Any] | None
    src: Path
    split: str


def split_plan(source: Source, *, shuffle: bool, seed: int) -> tuple[DatasetSchema, list[int]]:
    """A split's schema and the order its samples are written in (the same in every process)."""
    fmt = get_format(source.format_name, source.options)
    schema = fmt.read_schema(source.src, source.split)
    return schema, sample_order(fmt.count_samples(source.src, source.split), shuffle=shuffle, seed=seed)


def prepare_blocks(source: Source, schema: DatasetSchema, indices: Sequence[int]) -> Iterator[Prepared]:
    """The samples at ``indices``, checked and turned into tar members and label columns."""
    fmt = get_format(source.format_name, source.options)
    encoder, ext = LabelEncoder(schema), schema.image.encoding
    for block in fmt.iter_blocks(source.src, source.split, indices):
        check_block(schema, block, f"{source.src} ({source.split})")
        images = Rows(block.images) if isinstance(block.images, np.ndarray) else block.images
        labels = Rows(*encoder.encode(block.labels, block.extra))
        yield (sample_keys(block.indices), [(ext, images), ("labels.msgpack", labels)],
               label_columns(schema, block.labels), block.covered)


def _prepare_chunk(source: Source, schema: DatasetSchema, indices: Sequence[int]) -> list[Prepared]:
    return list(prepare_blocks(source, schema, indices))


def _parallel_blocks(source: Source, schema: DatasetSchema, order: Sequence[int],
                     workers: int) -> Iterator[Prepared]:
    """``prepare_blocks`` over ``order`` by ``workers`` processes, in order, with at most two
    chunks per worker waiting, so memory stays bounded whatever the split's size."""
    size = max(256, min(8192, -(-len(order) // (4 * workers))))
    chunks = iter([order[i:i + size] for i in range(0, len(order), size)])
    with multiprocessing.get_context("fork").Pool(workers, initializer=DieWithParent()) as pool:
        pending = deque(pool.apply_async(_prepare_chunk, (source, schema, c))
                        for c in itertools.islice(chunks, 2 * workers))
        while pending:
            done = pending.popleft().get()
            following = next(chunks, None)
            if following is not None:
                pending.append(pool.apply_async(_prepare_chunk, (source, schema, following)))
            yield from done


def stage_split(source: Source, out: Path, *, shuffle: bool = True, seed: int = 0,
                max_samples: int | None = DEFAULT_MAX_SAMPLES, max_bytes: int | None = DEFAULT_MAX_BYTES,
                workers: int = 1) -> ShardWriter:
    """Write one split into staging under ``out/<split>/`` (keeping the sound shards of an
    interrupted run of the same conversion); publish it later."""
    schema, order = split_plan(source, shuffle=shuffle, seed=seed)
    key = resume_key(schema, order, staging_source(source), (max_samples, max_bytes))
    writer = ShardWriter(out / source.split, schema, max_samples=max_samples, max_bytes=max_bytes,
                         publish_on_exit=False, resume_key=key)
    with writer, ProgressBar(total=len(order), desc=f"{schema.name}/{source.split}", unit="sample",
                      disable=None, leave=False) as bar:
        remaining = order[resume_position(writer, order):]
        bar.update(len(order) - len(remaining))
        blocks = (_parallel_blocks(source, schema, remaining, workers) if workers > 1
                  else prepare_blocks(source, schema, remaining))
        for keys, members, columns, count in blocks:
            writer.write_block(keys, members, columns)
            bar.update(count)
    return writer


def resume_position(writer: ShardWriter, order: Sequence[int]) -> int:
    """How much of ``order`` the shards kept from an interrupted run cover: up to the last
    sample of the last one (found by its key, the source index: samples a format skipped
    make this more than the samples kept)."""
    if not writer.shards:
        return 0
    path = writer.staging_dir / writer.shards[-1].name
    last = int(index_shard(path.read_bytes(), str(path)).keys[-1])
    return order.index(last) + 1


def conversion_key(source: Source, *, shuffle: bool, seed: int, limits: tuple[int | None, int | None]) -> str:
    """What a split's shards depend on, as one hash (the resume key of its staging)."""
    schema, order = split_plan(source, shuffle=shuffle, seed=seed)
    return resume_key(schema, order, staging_source(source), limits)


def staging_source(source: Source) -> str:
    """The source as a resume key sees it: format, options and every file's size and time."""
    return f"{source.format_name}\0{sorted((source.options or {}).items())}\0{source_fingerprint(source.src)}"


def convert(format_name: str, src: str | Path, out: str | Path, *,
            splits: Sequence[str] | None = None, shuffle: bool = True, seed: int = 0,
            max_samples: int | None = DEFAULT_MAX_SAMPLES,
            max_bytes: int | None = DEFAULT_MAX_BYTES,
            options: Mapping[str, Any] | None = None, workers: int = 1, num_nodes: int = 1,
            node_rank: int = 0, storage_options: dict[str, Any] | None = None,
            work_dir: str | Path | None = None) -> dict[str, Manifest]:
    """Convert every split (or the named ones) of a source dataset into shards under ``out``.
    ``options`` configure the source format (see :class:`SourceFormat`; most take none);
    ``workers`` processes read, check and encode samples, and the shards come out the same
    whatever their number.

    All splits are staged first and published together: a run that fails on any split
    publishes nothing and leaves earlier output as it was. A run that is interrupted
    (Ctrl-C, a killed process) leaves its finished shards staged, and running the same
    conversion again keeps those that are sound and writes only the rest.

    With ``num_nodes`` > 1 this process writes only node ``node_rank``'s share of the
    shards and a node manifest (see :mod:`shard_tools.nodes`); it returns no manifests.

    ``out`` may be an object-store URL (``s3://bucket/prefix``, with ``storage_options``):
    the shards are made in a local ``work_dir`` (default: one per URL under the user's
    cache directory), then uploaded split by split with each manifest last; an interrupted
    run resumes both (see :mod:`shard_tools.remote_out`)."""
    if is_remote_output(out):
        if num_nodes > 1:
            raise ConversionError(f"{out}: multi-node conversion writes to a shared directory, not a URL")
        return convert_remote(format_name, src, str(out), splits=splits, work_dir=work_dir,
                              storage_options=storage_options, shuffle=shuffle, seed=seed, max_samples=max_samples,
                              max_bytes=max_bytes, options=options, workers=workers)
    if work_dir is not None:
        raise ConversionError(f"work_dir: only used when OUT is a URL; {out} is a local directory")
    if workers < 1:
        raise ConversionError(f"workers: expected >= 1, found {workers}")
    fmt, src, out = get_format(format_name, options), Path(src), Path(out)
    wanted = tuple(dict.fromkeys(splits)) if splits else fmt.splits(src)
    for split in wanted:
        fmt.read_schema(src, split)  # fail on inconsistent input before writing anything
    with contextlib.ExitStack() as held:
        for split in wanted:  # one conversion of a split at a time; node shares together, each once
            held.enter_context(conversion_lock(out / split, LOCK, shared=num_nodes > 1))
            if num_nodes > 1:
                held.enter_context(conversion_lock(out / split, f".convert.node-{node_rank}-of-{num_nodes}.lock"))
        if num_nodes > 1:
            from shard_tools.nodes import check_node_settings, convert_share

            samples = check_node_settings(num_nodes, node_rank, max_samples, max_bytes)
            for split in wanted:
                convert_share(Source(format_name, dict(options) if options else None, src, split), out,
                              num_nodes=num_nodes, node_rank=node_rank, max_samples=samples, shuffle=shuffle,
                              seed=seed, workers=workers)
            return {}
        manifests = _stage_and_publish([Source(format_name, dict(options) if options else None, src, split)
                                        for split in wanted], out, shuffle=shuffle, seed=seed,
                                       max_samples=max_samples, max_bytes=max_bytes, workers=workers)
    for split, manifest in manifests.items():
        report_skipped(out / split, fmt.count_samples(src, split), manifest.num_samples)
    return manifests


def _stage_and_publish(sources: Sequence[Source], out: Path, *, shuffle: bool, seed: int, max_samples: int | None,
                       max_bytes: int | None, workers: int) -> dict[str, Manifest]:
    """Stage every split, then publish them all; an error publishes none."""
    staged: list[Any] = []  # ShardWriter or parallel.StagedSplit: both publish() and abort()
    try:
        for source in sources:
            if max_bytes is None and max_samples is not None:  # planned slices, any process writes any shard
                from shard_tools.parallel import stage_split_slices

                staged.append(stage_split_slices(source, out, shuffle=shuffle, seed=seed, max_samples=max_samples,
                                                 workers=workers))
            else:
                staged.append(stage_split(source, out, shuffle=shuffle, seed=seed, max_samples=max_samples,
                                          max_bytes=max_bytes, workers=workers))
    except Exception:
        for writer in staged:
            writer.abort()
        raise
    return {writer.schema.split: writer.publish() for writer in staged}


def report_skipped(split_dir: Path, planned: int, written: int) -> None:
    """One summary line when the format skipped samples (each one was warned about)."""
    if written < planned:
        log.warning("%s: %d of %d samples skipped as bad input (see the warnings above); %d written",
                    split_dir, planned - written, planned, written)
