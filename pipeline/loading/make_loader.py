"""``make_loader``: from what a user names to a ready, checked :class:`ShardLoader`, and the
steps every entry shares (``mix`` too): finding a split, checking its headers and sizes,
planning its shards by their manifest counts."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from pipeline.errors import ConfigError, HeaderMismatchError, ManifestError, ShardFormatError
from pipeline.format.header import read_header_from
from pipeline.format.manifest import MIN_SAMPLE_BYTES
from pipeline.format.schema import DatasetSchema
from pipeline.format.shard_index import count_samples
from pipeline.io.disk_cache import DEFAULT_LIMIT
from pipeline.io.reading import read_header, read_header_and_size
from pipeline.io.shard_sets import ShardSet, resolve_shards
from pipeline.io.storage import read_shard
from pipeline.loading.decode_spec import DecodeSpec
from pipeline.loading.inputs import ShardInput, Transform
from pipeline.loading.loader import ShardLoader, build_loader, default_world
from pipeline.loading.planning import SinglePlanner, Slice
from pipeline.loading.settings import check_loader_settings
from pipeline.loading.stream import StreamConfig

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


def find_split(source: str | Sequence[str], split: str | None, storage_options: dict[str, Any] | None,
               require_manifest: bool = True) -> ShardSet:
    """The shard set of ``split`` named by ``source``; a split directory without a manifest
    is refused unless ``require_manifest`` is False (see :meth:`ShardSet.require_manifest`)."""
    shards = pick_split(resolve_shards(source, split=split, storage_options=storage_options), split, source)
    if require_manifest:
        shards.require_manifest()
    if not shards.urls:
        raise ShardFormatError(f"{source}: split {split!r} has no shards")
    return shards


def read_schema(source: str | Sequence[str], *, split: str | None = "train",
                storage_options: dict[str, Any] | None = None, require_manifest: bool = True) -> DatasetSchema:
    """The schema of one split (from its manifest, else its first shard's header)."""
    shards = find_split(source, split, storage_options, require_manifest)
    return shards.manifest.schema if shards.manifest else read_header(shards.urls[0], storage_options)


def _header(url: str, storage_options: dict[str, Any] | None, allow_pipe: bool) -> tuple[DatasetSchema, int | None]:
    if url.startswith("pipe:"):  # a command's output: run it (if allowed) and read the first member
        return read_header_from(io.BytesIO(read_shard(url, allow_pipe=allow_pipe)), url), None
    return read_header_and_size(url, storage_options)


def check_headers(shards: ShardSet, storage_options: dict[str, Any] | None, allow_pipe: bool = False,
                  on_error: str = "raise") -> tuple[DatasetSchema, list[int | None]]:
    """The split's schema and every shard's size: every shard's header must equal the schema
    (all mismatches are listed), and, with a manifest, every shard's size must be the
    manifest's: a manifest that does not describe its shards is refused before its counts
    are used (``on_error="skip"``: a warning; see :func:`manifest_slices`)."""
    urls = shards.urls
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = list(pool.map(lambda u: _header(u, storage_options, allow_pipe), urls))
    reference = shards.manifest.schema if shards.manifest else found[0][0]
    bad = [u for u, (header, _) in zip(urls, found, strict=True) if header != reference]
    if bad:
        raise HeaderMismatchError(f"{len(bad)} shard(s) disagree with the split's schema "
                                  f"({reference.name!r}, split {reference.split!r}): {bad[:10]}")
    sizes = [size for _, size in found]
    if shards.manifest is not None:
        differ = [(u, info.bytes, size) for u, info, size in zip(urls, shards.manifest.shards, sizes, strict=True)
                  if size is not None and size != info.bytes]
        if differ:
            listed = "; ".join(f"{u}: {expected} bytes listed, {size} found" for u, expected, size in differ[:5])
            message = (f"{shards.manifest_url}: {len(differ)} shard(s) differ in size from the manifest ({listed}); "
                       "the manifest does not describe these shards")
            if on_error == "raise":
                raise ManifestError(message)
            log.warning("%s", message)
    return reference, sizes


def manifest_slices(shards: ShardSet, options: dict[str, Any] | None, cache_dir: str | None,
                    allow_pipe: bool, sizes: Sequence[int | None] | None = None) -> tuple[Slice, ...]:
    """Every shard as a whole slice, with its sample count: from the manifest (no more than
    fit in the shard's real ``sizes``, where known, so that nothing is planned by a count
    its file could not hold), else counted."""
    if shards.manifest is not None:
        found = sizes or [None] * len(shards.urls)
        return tuple(Slice(u, 0, s.samples if size is None else min(s.samples, size // MIN_SAMPLE_BYTES))
                     for u, s, size in zip(shards.urls, shards.manifest.shards, found, strict=True))
    log.warning("%s: no manifest; reading every shard once to count its samples", shards.label)
    counts = [count_samples(read_shard(u, storage_options=options, cache_dir=cache_dir, allow_pipe=allow_pipe), u)
              for u in shards.urls]
    return tuple(Slice(u, 0, n) for u, n in zip(shards.urls, counts, strict=True))


HAND_OFF_BYTES = 8 << 20


def image_bytes(schema: DatasetSchema, decode: DecodeSpec | None = None) -> int:
    """Bytes of one image in a batch: a decode spec's size, the stored size, or a 256x256
    guess when sizes vary."""
    if decode is not None:
        return 3 * decode.size * decode.size
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
                prefetch_factor: int = 2, pin_memory: bool = False, require_manifest: bool = True,
                cache_limit: int = DEFAULT_LIMIT, decode: DecodeSpec | Mapping[str, Any] | None = None) -> ShardLoader:
    """A loader over one split of shards; see ``docs/loader.md``.

    ``source``: a shard-set root (``split`` picks the subdirectory), a split directory, a
    manifest, a brace pattern, or a list of shard URLs (local, ``file://``, ``s3://``,
    ``http(s)://``). Yields ``(images, labels)`` (``(images, labels, keys)`` with
    ``with_keys``): images ``[B, C, H, W]`` uint8 unless ``transform`` says otherwise, labels
    ``{head: int64 class}`` plus ``{head + ".value": float32}`` for quantized heads.
    ``decode``: JPEG/PNG images decoded at the size training needs (``[B, 3, T, T]``; a
    :class:`~pipeline.loading.decode_spec.DecodeSpec` or a mapping of its fields), before
    ``transform``."""
    world_size, rank = resolve_world(world_size, rank)
    check_loader_settings(batch_size=batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                          on_error=on_error, uneven=uneven, world_size=world_size, rank=rank)
    decode = DecodeSpec.of(decode)
    if any(str(u).startswith("pipe:") for u in ([source] if isinstance(source, str) else source)) \
            and not allow_pipe:
        raise ShardFormatError(f"{source}: pipe: URLs run shell commands; pass allow_pipe=True to allow them")
    shards = find_split(source, split, storage_options, require_manifest)
    schema, sizes = check_headers(shards, storage_options, allow_pipe, on_error)
    check_decode(schema, decode, transform, str(source))
    slices = manifest_slices(shards, storage_options, cache_dir, allow_pipe, sizes)
    only = ShardInput(name=schema.name, schema=schema, shards=slices, storage_options=storage_options, decode=decode)
    config = StreamConfig(inputs=(only,), planner=SinglePlanner(slices, uneven=uneven, drop_last=drop_last),
                          schema=schema, batch_size=batch_size, seed=seed, shuffle=shuffle,
                          shuffle_buffer=shuffle_buffer, world_size=world_size, rank=rank, num_workers=num_workers,
                          on_error=on_error, cache_dir=cache_dir, cache_limit=cache_limit, retries=retries,
                          allow_pipe=allow_pipe,
                          batches_per_hand_off=hand_off_group(batch_size * image_bytes(schema, decode)))
    config.plan(0)  # fail now, not in a worker, on impossible settings
    loader = build_loader(config, transform=transform, with_keys=with_keys, prefetch_factor=prefetch_factor,
                          pin_memory=pin_memory)
    loader.image_shape = probe_shape(decode.shape, transform) if decode is not None else None
    return loader


def check_decode(schema: DatasetSchema, decode: DecodeSpec | None, transform: Transform | None, where: str) -> None:
    """A decode spec is for JPEG/PNG images; images of varying size need it or a transform."""
    if decode is not None and schema.image.encoding == "raw":
        raise ConfigError(f"{where}: decode= makes JPEG/PNG images at a size; the images of {schema.name!r} are raw "
                          "pixels: give a transform instead")
    if not schema.image.fixed_size and transform is None and decode is None:
        raise ConfigError(f"{where}: the images of {schema.name!r} vary in size ({schema.image.describe()}); "
                          "pass decode=pipeline.DecodeSpec(224) (decoded at the size training needs) or a transform "
                          "that gives every image one size, e.g. torchvision.transforms.v2.RandomResizedCrop(224)")


def probe_shape(shape: tuple[int, ...], transform: Transform | None) -> tuple[int, ...] | None:
    """What ``transform`` makes of a blank uint8 image of ``shape`` (None if it refuses one)."""
    if transform is None:
        return shape
    try:
        return tuple(transform(torch.zeros(shape, dtype=torch.uint8)).shape)
    except (TypeError, ValueError, RuntimeError):
        return None


def resolve_world(world_size: int | None, rank: int | None) -> tuple[int, int]:
    """``world_size`` and ``rank`` as given, else the running torch.distributed group's."""
    default_size, default_rank = default_world()
    return (default_size if world_size is None else world_size), (default_rank if rank is None else rank)
