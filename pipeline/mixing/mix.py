"""``mix``: one loader over several shard sets, with exact per-source counts per epoch.

How many samples each source gives per epoch (:func:`epoch_targets`) is fixed once, from
the sources' manifest counts and what the user asked for; which ones, and in what order,
is planned per epoch by :mod:`pipeline.mixing.plan`; labels are mapped into the union schema of
:mod:`pipeline.mixing.union`. See ``docs/mixing.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeline.errors import ConfigError
from pipeline.format.schema import DatasetSchema, ImageSpec
from pipeline.io.disk_cache import DEFAULT_LIMIT
from pipeline.loading.decode_spec import DecodeSpec
from pipeline.loading.inputs import ShardInput, Transform
from pipeline.loading.loader import ShardLoader, build_loader
from pipeline.loading.make_loader import (
    check_decode,
    check_headers,
    find_split,
    hand_off_group,
    image_bytes,
    manifest_slices,
    resolve_world,
)
from pipeline.loading.planning import Slice
from pipeline.loading.settings import UNEVEN_POLICIES, check_loader_settings
from pipeline.loading.stream import StreamConfig
from pipeline.mixing.plan import MixPlan, apportion
from pipeline.mixing.transforms import Chain, check_transform_sizes
from pipeline.mixing.union import DATASET_HEAD, ToUnion, source_name, union_schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixSource:
    """One source of a mix: a shard set (anything ``make_loader`` takes) and at most one of
    ``weight`` (share of the epoch), ``repeat`` (times its size) or ``choose`` (samples per
    epoch). With none of them a source gives each of its samples once (``repeat=1``).
    ``name`` (default: the dataset's name) names its namespaced heads and its ``dataset`` class.
    ``storage_options`` (fsspec) replace the mix's for this source: sources in different
    buckets, endpoints or accounts, or one local and one remote. ``decode`` (JPEG/PNG sources)
    decodes its images at the size training needs (a :class:`~pipeline.loading.decode_spec.DecodeSpec`).
    ``transform`` runs on this source's images (uint8 CxHxW tensors) before the mix's
    ``transform``: a resize or crop suited to its image size, say (picklable, like any
    transform that goes to workers)."""

    source: str | Sequence[str]
    split: str | None = "train"
    weight: float | None = None
    repeat: float | None = None
    choose: int | None = None
    name: str | None = None
    storage_options: Mapping[str, Any] | None = None
    transform: Transform | None = None
    decode: DecodeSpec | None = None  # a mapping of its fields (from YAML) is made one

    def __post_init__(self) -> None:
        object.__setattr__(self, "decode", DecodeSpec.of(self.decode, f"mix source {self.source}: decode"))
        given = {k: v for k, v in (("weight", self.weight), ("repeat", self.repeat), ("choose", self.choose))
                 if v is not None}
        if len(given) > 1:
            raise ConfigError(f"mix source {self.source}: give at most one of weight, repeat, choose; "
                                f"found {given}")
        for key, value in given.items():
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) if key == "choose" \
                else (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                      and value >= 0)
            if not ok:
                expected = "an int >= 0" if key == "choose" else "a finite number >= 0"
                raise ConfigError(f"mix source {self.source}: {key} expected {expected}, found {value!r}")


def _fixed_count(source: MixSource, size: int) -> int | None:
    if source.choose is not None:
        return source.choose
    if source.repeat is not None or source.weight is None:
        return math.floor((1.0 if source.repeat is None else source.repeat) * size + 0.5)  # halves round up
    return None


def epoch_targets(sizes: Sequence[int], sources: Sequence[MixSource], epoch_samples: int | None = None,
                  unit: int = 1, uneven: str = "drop") -> list[int]:
    """Samples per epoch from each source: ``choose`` or ``repeat * size`` (halves rounded
    up) where given, and the rest of ``epoch_samples`` (default: all sources' sizes summed)
    split by ``weight`` (largest remainder). The total is then rounded to a multiple of
    ``unit`` (ranks, times the batch size with ``drop_last``), keeping the proportions
    (largest remainder): down with ``uneven="drop"``, up with ``"pad"`` (then no source
    gets fewer samples than asked, so an evaluation sees every sample)."""
    if uneven not in UNEVEN_POLICIES:
        raise ConfigError(f"uneven: expected one of {UNEVEN_POLICIES}, found {uneven!r}")
    counts = [_fixed_count(s, n) for s, n in zip(sources, sizes, strict=True)]
    weighted = [k for k, c in enumerate(counts) if c is None]
    if weighted:
        total = sum(sizes) if epoch_samples is None else epoch_samples
        rest = total - sum(c for c in counts if c is not None)
        if rest < 0:
            raise ConfigError(f"mix: choose/repeat sources take {total - rest} samples, more than the epoch's "
                                f"{total}; raise epoch_samples")
        weights = [sources[k].weight or 0.0 for k in weighted]
        if rest and not sum(weights):
            raise ConfigError(f"mix: {rest} samples of the epoch are left for the weighted sources, but their "
                                "weights are all 0")
        for k, share in zip(weighted, apportion(rest, weights) if rest else [0] * len(weighted), strict=True):
            counts[k] = share
    fixed = [int(c or 0) for c in counts]
    if not weighted and epoch_samples is not None and epoch_samples != sum(fixed):
        raise ConfigError(f"mix: epoch_samples={epoch_samples} but the sources' choose/repeat counts sum to "
                            f"{sum(fixed)}; drop epoch_samples or give some sources a weight")
    total = sum(fixed)
    if total % unit:
        rounded = total - total % unit + (unit if uneven == "pad" else 0)
        log.info("mix: %d samples per epoch rounded %s to %d, a multiple of %d (ranks x batch size)",
                 total, "up" if uneven == "pad" else "down", rounded, unit)
        fixed = apportion(rounded, fixed) if rounded else [0] * len(fixed)
    if sum(fixed) == 0:
        raise ConfigError(f"mix: the epoch has no samples (targets {fixed}; need at least {unit})")
    return fixed


def mix(sources: Sequence[MixSource | Mapping[str, Any]], *, batch_size: int, epoch_samples: int | None = None,
        num_workers: int = 2, shuffle: bool = True, seed: int = 0, transform: Transform | None = None,
        shuffle_buffer: int = 4096, world_size: int | None = None, rank: int | None = None,
        drop_last: bool = False, on_error: str = "raise", storage_options: dict[str, Any] | None = None,
        cache_dir: str | None = None, retries: int = 3, with_keys: bool = False, prefetch_factor: int = 2,
        pin_memory: bool = False, dataset_head: str = DATASET_HEAD, uneven: str = "drop",
        require_manifest: bool = True, cache_limit: int = DEFAULT_LIMIT) -> ShardLoader:
    """A loader over several sources whose per-epoch counts are exact (see
    :func:`epoch_targets`), on every rank and every worker alike. Labels follow the union
    schema (``loader.schema``): heads a sample's source lacks are class ``-1`` (value NaN),
    and ``labels[dataset_head]`` says which source it came from. Sources whose image specs
    differ need transforms (``transform``, or each source's) to give every image one size;
    this is checked here, on a blank image of each source's size. ``uneven``: how an epoch that
    does not split evenly across ranks is rounded (see :func:`epoch_targets`). Other
    arguments as ``make_loader``."""
    specs = [s if isinstance(s, MixSource) else MixSource(**s) for s in sources]
    if not specs:
        raise ConfigError("mix: expected at least one source, found none")
    world_size, rank = resolve_world(world_size, rank)
    check_loader_settings(batch_size=batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                          on_error=on_error, uneven=uneven, world_size=world_size, rank=rank)
    found = [_read_source(k, spec, storage_options, cache_dir, require_manifest, on_error)
             for k, spec in enumerate(specs)]
    names = [spec.name or source_name(put.schema.name) for spec, put in zip(specs, found, strict=True)]
    schemas = [put.schema for put in found]
    union, head_map = union_schema(schemas, names, split=schemas[0].split,
                                   resized=transform is not None or any(s.transform or s.decode for s in specs),
                                   dataset_head=dataset_head)
    image_shape = _check_images(specs, [put.schema for put in found], names, transform)
    targets = _targets(specs, found, names, epoch_samples, world_size * (batch_size if drop_last else 1), uneven)
    inputs = tuple(replace(put, name=name, relabel=ToUnion(union, head_map, k))
                   for k, (put, name) in enumerate(zip(found, names, strict=True)))
    planner = MixPlan(tuple(put.shards for put in inputs), tuple(targets), tuple(names))
    largest_image = max(image_bytes(s, spec.decode) for s, spec in zip(schemas, specs, strict=True))
    config = StreamConfig(inputs=inputs, planner=planner, schema=union, batch_size=batch_size, seed=seed,
                          shuffle=shuffle, shuffle_buffer=shuffle_buffer, world_size=world_size, rank=rank,
                          num_workers=num_workers, on_error=on_error, cache_dir=cache_dir, cache_limit=cache_limit,
                          retries=retries, batches_per_hand_off=hand_off_group(batch_size * largest_image))
    config.plan(0)  # fail now, not in a worker, on impossible settings
    loader = build_loader(config, transform=transform, with_keys=with_keys, prefetch_factor=prefetch_factor,
                          pin_memory=pin_memory)
    loader.image_shape = image_shape
    return loader


def _read_source(k: int, spec: MixSource, storage_options: dict[str, Any] | None, cache_dir: str | None,
                 require_manifest: bool, on_error: str) -> ShardInput:
    """Source ``k`` of a mix as a loader input: its split found, headers and sizes checked,
    shards with their counts; its own storage options and transform (no relabel yet)."""
    options = storage_options if spec.storage_options is None else dict(spec.storage_options)
    shards = find_split(spec.source, spec.split, options, require_manifest)
    schema, sizes = check_headers(shards, options, on_error=on_error)
    if spec.decode is not None:
        check_decode(schema, spec.decode, spec.transform, f"mix source {spec.source}")
    slices = tuple(Slice(s.url, s.start, s.stop, k) for s in manifest_slices(shards, options, cache_dir, False, sizes))
    return ShardInput(name=schema.name, schema=schema, shards=slices, storage_options=options,
                      transform=spec.transform, decode=spec.decode)


def _check_images(specs: Sequence[MixSource], schemas: Sequence[DatasetSchema], names: Sequence[str],
                  transform: Transform | None) -> tuple[int, ...] | None:
    """The one image shape the sources' decode specs and transforms give (checked now, on
    blank images, not in a worker), or None when there is nothing to check. A source with a
    decode spec is probed with the images it decodes to."""
    own = [spec.transform for spec in specs]
    per_source = any(t is not None for t in own) or any(spec.decode for spec in specs)
    if not per_source and (transform is None or len({s.image for s in schemas}) == 1):
        return None
    probed = [replace(schema, image=ImageSpec(spec.decode.size, spec.decode.size, 3)) if spec.decode else schema
              for schema, spec in zip(schemas, specs, strict=True)]
    decoded = any(spec.decode for spec in specs)
    what = ("each source's decode spec and transform (then the mix's)" if decoded
            else "each source's transform (then the mix's)" if per_source else "the transform")
    return check_transform_sizes([Chain(first, transform) for first in own], probed, names, what)


def _targets(specs: Sequence[MixSource], found: Sequence[ShardInput], names: Sequence[str],
             epoch_samples: int | None, unit: int, uneven: str) -> list[int]:
    """Each source's samples per epoch; a source with none but a share is an error."""
    sizes = [put.num_samples for put in found]
    targets = epoch_targets(sizes, specs, epoch_samples, unit, uneven)
    empty = [f"{name} ({spec.source})" for name, spec, size, target in zip(names, specs, sizes, targets, strict=True)
             if target and not size]
    if empty:
        raise ConfigError(f"mix: source(s) {', '.join(empty)} have no samples but a share of the epoch")
    log.info("mix of %s: %s samples per epoch", ", ".join(names),
             ", ".join(f"{n} {t}" for n, t in zip(names, targets, strict=True)))
    return targets
