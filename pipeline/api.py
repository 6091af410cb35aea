"""``make_loader``: from what a user names to a ready, checked :class:`ShardLoader`."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.batching import Transform
from pipeline.errors import HeaderMismatchError, PipelineError, ShardFormatError
from pipeline.header import read_header, read_header_from
from pipeline.loader import ShardLoader, StreamConfig, build_loader, default_world
from pipeline.planning import UNEVEN_POLICIES, Slice
from pipeline.schema import DatasetSchema
from pipeline.sources import ShardSet, resolve_shards
from pipeline.storage import read_shard
from pipeline.tario import count_samples

log = logging.getLogger(__name__)


def pick_split(sets: list[ShardSet], split: str | None, source: object) -> ShardSet:
    """The one shard set of ``split`` among those a source resolved to (else an error)."""
    if len(sets) == 1:
        return sets[0]
    named = [s for s in sets if s.split == split]
    if len(named) == 1:
        return named[0]
    raise ShardFormatError(f"{source}: expected one shard set for split {split!r}, found "
                           f"{[s.label for s in sets]}")


def read_schema(source: str | Sequence[str], *, split: str | None = "train",
                storage_options: dict[str, Any] | None = None) -> DatasetSchema:
    """The schema of one split (from its manifest, else its first shard's header)."""
    shards = pick_split(resolve_shards(source, split=split, storage_options=storage_options), split, source)
    return shards.manifest.schema if shards.manifest else read_header(shards.urls[0], storage_options)


def _header(url: str, storage_options: dict[str, Any] | None, allow_pipe: bool) -> DatasetSchema:
    if url.startswith("pipe:"):  # a command's output: run it (if allowed) and read the first member
        return read_header_from(io.BytesIO(read_shard(url, allow_pipe=allow_pipe)), url)
    return read_header(url, storage_options)


def check_headers(urls: Sequence[str], expected: DatasetSchema | None,
                  storage_options: dict[str, Any] | None, allow_pipe: bool = False) -> DatasetSchema:
    """The split's schema; every shard's header must equal it (all mismatches are listed)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        headers = list(pool.map(lambda u: _header(u, storage_options, allow_pipe), urls))
    reference = expected or headers[0]
    bad = [u for u, h in zip(urls, headers, strict=True) if h != reference]
    if bad:
        raise HeaderMismatchError(f"{len(bad)} shard(s) disagree with the split's schema "
                                  f"({reference.name!r}, split {reference.split!r}): {bad[:10]}")
    return reference


def manifest_slices(shards: ShardSet, options: dict[str, Any] | None, cache_dir: str | None,
                    allow_pipe: bool) -> tuple[Slice, ...]:
    """Every shard as a whole slice, with its sample count (from the manifest, else counted)."""
    if shards.manifest is not None:
        return tuple(Slice(u, 0, s.samples) for u, s in zip(shards.urls, shards.manifest.shards, strict=True))
    log.warning("%s: no manifest; reading every shard once to count its samples", shards.label)
    counts = [count_samples(read_shard(u, storage_options=options, cache_dir=cache_dir, allow_pipe=allow_pipe), u)
              for u in shards.urls]
    return tuple(Slice(u, 0, n) for u, n in zip(shards.urls, counts, strict=True))


HAND_OFF_BYTES = 8 << 20


def image_bytes(schema: DatasetSchema) -> int:
    """Bytes of one decoded image (a 256x256 guess when sizes vary)."""
    return schema.image.nbytes if schema.image.fixed_size else schema.image.channels * 256 * 256


def hand_off_group(batch_bytes: int) -> int:
    """Batches a worker passes to the main process at once: up to 8, about 8 MiB in all."""
    return max(1, min(8, HAND_OFF_BYTES // max(1, batch_bytes)))


def make_loader(source: str | Sequence[str], *, split: str | None = "train", batch_size: int,
                num_workers: int = 2, shuffle: bool = True, seed: int = 0, transform: Transform | None = None,
                shuffle_buffer: int = 4096, world_size: int | None = None, rank: int | None = None,
                uneven: str = "drop", drop_last: bool = False, on_error: str = "raise",
                storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
                retries: int = 3, allow_pipe: bool = False, with_keys: bool = False,
                prefetch_factor: int = 2, pin_memory: bool = False) -> ShardLoader:
    """A loader over one split of shards; see ``docs/loader.md``.

    ``source``: a shard-set root (``split`` picks the subdirectory), a split directory, a
    manifest, a brace pattern, or a list of shard URLs (local, ``file://``, ``s3://``,
    ``http(s)://``). Yields ``(images, labels)`` (``(images, labels, keys)`` with
    ``with_keys``): images ``[B, C, H, W]`` uint8 unless ``transform`` says otherwise, labels
    ``{head: int64 class}`` plus ``{head + ".value": float32}`` for quantized heads."""
    if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
        raise PipelineError(f"expected batch_size >= 1, num_workers >= 0, shuffle_buffer >= 1; found "
                            f"{batch_size}, {num_workers}, {shuffle_buffer}")
    if uneven not in UNEVEN_POLICIES:
        raise PipelineError(f"uneven: expected one of {UNEVEN_POLICIES}, found {uneven!r}")
    if any(str(u).startswith("pipe:") for u in ([source] if isinstance(source, str) else source)) \
            and not allow_pipe:
        raise ShardFormatError(f"{source}: pipe: URLs run shell commands; pass allow_pipe=True to allow them")
    default_size, default_rank = default_world()
    world_size = default_size if world_size is None else world_size
    rank = default_rank if rank is None else rank
    shards = pick_split(resolve_shards(source, split=split, storage_options=storage_options), split, source)
    expected = shards.manifest.schema if shards.manifest else None
    schema = check_headers(shards.urls, expected, storage_options, allow_pipe)
    if not schema.image.fixed_size and transform is None:
        raise PipelineError(f"{source}: the images of {schema.name!r} vary in size ({schema.image.describe()}); "
                            "pass a transform that gives every image one size, e.g. "
                            "torchvision.transforms.v2.RandomResizedCrop(224)")
    config = StreamConfig(shards=manifest_slices(shards, storage_options, cache_dir, allow_pipe), schema=schema,
                          batch_size=batch_size, seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                          world_size=world_size, rank=rank, num_workers=num_workers, uneven=uneven,
                          drop_last=drop_last, on_error=on_error, storage_options=storage_options,
                          cache_dir=cache_dir, retries=retries, allow_pipe=allow_pipe,
                          batches_per_hand_off=hand_off_group(batch_size * image_bytes(schema)))
    config.plan(0)  # fail now, not in a worker, on impossible settings
    return build_loader(config, transform=transform, with_keys=with_keys, prefetch_factor=prefetch_factor,
                        pin_memory=pin_memory)
