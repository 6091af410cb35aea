"""Turning a format's sample blocks into what the writer takes: each block checked against
the schema, its label records encoded, its tar members laid out (with numpy, a block at a
time), in one process or in a pool of worker processes that keeps the order."""

from __future__ import annotations

import itertools
import multiprocessing
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np

from pipeline.errors import ConversionError
from pipeline.format.label_columns import Columns, label_columns
from pipeline.format.labels import LabelEncoder
from pipeline.format.schema import QUANTIZATION_LEVELS, DatasetSchema
from pipeline.format.tar_write import Member, Rows
from pipeline.lifetime import DieWithParent
from shard_tools.conversion.plan import SourceSplit, SplitPlan, sample_keys
from shard_tools.formats import SampleBlock

Prepared = tuple[list[str], list[tuple[str, Member]], Columns, int]  # keys, members, labels, indices covered


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


def encode_block(schema: DatasetSchema, encoder: LabelEncoder, block: SampleBlock, where: str,
                 keys: Sequence[str] | None = None) -> Prepared:
    """One block checked against the schema and turned into tar members (image, label
    record) and label columns; keys default to the samples' source indices. Every way into
    shards (the converters and ``write_shards``) goes through here."""
    check_block(schema, block, where)
    images = Rows(block.images) if isinstance(block.images, np.ndarray) else block.images
    labels = Rows(*encoder.encode(block.labels, block.extra))
    return (list(keys) if keys is not None else sample_keys(block.indices),
            [(schema.image.encoding, images), ("labels.msgpack", labels)], label_columns(schema, block.labels),
            block.covered)


def prepare_blocks(source: SourceSplit, schema: DatasetSchema, indices: Sequence[int]) -> Iterator[Prepared]:
    """The samples at ``indices``, checked and encoded (the source and schema of a plan, not
    the plan: a worker is not sent the whole order)."""
    encoder = LabelEncoder(schema)
    for block in source.format.iter_blocks(source.src, source.split, indices):
        yield encode_block(schema, encoder, block, f"{source.src} ({source.split})")


def _prepare_chunk(source: SourceSplit, schema: DatasetSchema, indices: Sequence[int]) -> list[Prepared]:
    return list(prepare_blocks(source, schema, indices))


def parallel_blocks(plan: SplitPlan, order: Sequence[int], workers: int) -> Iterator[Prepared]:
    """:func:`prepare_blocks` over ``order`` by ``workers`` processes, in order, with at most
    two chunks per worker waiting, so memory stays bounded whatever the split's size."""
    size = max(256, min(8192, -(-len(order) // (4 * workers))))
    chunks = iter([order[i:i + size] for i in range(0, len(order), size)])
    with multiprocessing.get_context("fork").Pool(workers, initializer=DieWithParent()) as pool:
        job = (plan.source, plan.schema)
        pending = deque(pool.apply_async(_prepare_chunk, (*job, c)) for c in itertools.islice(chunks, 2 * workers))
        while pending:
            done = pending.popleft().get()
            following = next(chunks, None)
            if following is not None:
                pending.append(pool.apply_async(_prepare_chunk, (*job, following)))
            yield from done
