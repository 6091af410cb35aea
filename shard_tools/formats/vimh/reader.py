"""VIMH source format: ``train_batch``/``test_batch`` pickles or ``train``/``test`` binary
files, plus ``vimh_dataset_info.json`` (versions 1.0, 2.x, 3.0).

Head ``id`` is named ``parameter_names[id]`` (``param_<id>`` with a warning when the id is
beyond the list). A quantized byte ``q`` means the real value ``min + q/255*(max-min)``;
a head has ``round((max-min)/step)+1`` classes when ``step > 0`` (else 256) and a
sample's class is the step nearest its real value.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConversionError, SchemaError
from pipeline.format.schema import DatasetSchema, Head, ImageSpec, Provenance
from shard_tools.formats.base import BLOCK_BYTES, SampleBlock, blocks_of
from shard_tools.formats.dataset_info import DatasetInfo, Dims, head_description, head_name, read_dataset_info
from shard_tools.formats.mh_pickles import MultiheadSplit, load_pickle
from shard_tools.formats.vimh.binary import load_binary
from shard_tools.version import CONVERTER_VERSION

log = logging.getLogger(__name__)

NAME = "vimh"
METADATA_FILE = "vimh_dataset_info.json"
SPLIT_FILES = {"train": ("train_batch", "train"), "test": ("test_batch", "test")}
_DIR_DIMS = re.compile(r"vimh-(\d+)x(\d+)x(\d+)")


def _check_dir(src: Path) -> Path:
    if not src.exists():
        raise ConversionError(f"{src}: no such directory (expected a VIMH dataset directory)")
    if not src.is_dir():
        raise ConversionError(f"{src}: expected a VIMH dataset directory, found a file")
    return src


def read_metadata(src: Path) -> DatasetInfo:
    """``vimh_dataset_info.json`` of a VIMH directory (defaults when it is missing)."""
    return read_dataset_info(_check_dir(src), METADATA_FILE)


def splits(src: Path) -> tuple[str, ...]:
    """``train`` and/or ``test``, whichever has a pickle or a binary file."""
    found = tuple(s for s, files in SPLIT_FILES.items()
                  if any((_check_dir(src) / f).is_file() for f in files))
    if not found:
        wanted = [f for files in SPLIT_FILES.values() for f in files]
        raise ConversionError(f"{src}: empty dataset: expected one of {wanted}, found none")
    return found


def _load(src: Path, split: str) -> MultiheadSplit:
    if split not in SPLIT_FILES:
        raise ConversionError(f"{src}: unknown split {split!r}; VIMH has {list(SPLIT_FILES)}")
    pickled, binary = (_check_dir(src) / f for f in SPLIT_FILES[split])
    if pickled.is_file():
        if binary.is_file():
            log.info("%s: both %s and %s exist; using the pickle", src, pickled.name, binary.name)
        data = load_pickle(pickled)
    elif binary.is_file():
        data = load_binary(binary, read_metadata(src).header_hint)
    else:
        raise ConversionError(f"{src}: split {split!r}: expected {pickled.name} or {binary.name}")
    if len(data) == 0:
        raise ConversionError(f"{data.path}: empty dataset: no samples")
    return data


def _dims(src: Path, meta: DatasetInfo, data: MultiheadSplit) -> Dims:
    """Dimensions on which directory name, JSON and data agree."""
    match = _DIR_DIMS.search(src.name)
    sources = {f"directory name {src.name!r}": (int(match[1]), int(match[2]), int(match[3]))
               if match else None, f"{meta.path}": meta.dims, f"{data.path}": data.dims}
    known = {where: d for where, d in sources.items() if d is not None}
    if len(set(known.values())) > 1:
        said = ", ".join(f"{where} says {'x'.join(map(str, d))}" for where, d in known.items())
        raise ConversionError(f"{src}: image dimensions (HxWxC) disagree: {said}")
    if not known:
        raise ConversionError(f"{src}: cannot tell image dimensions: no vimh-HxWxC directory name, "
                              f"no {METADATA_FILE} dimensions, no dimensions in {data.path.name}")
    dims = next(iter(known.values()))
    row = data.images.shape[1]
    if row != dims[0] * dims[1] * dims[2]:
        raise ConversionError(f"{data.path}: sample 0: image has {row} bytes, expected "
                              f"H*W*C = {dims[0] * dims[1] * dims[2]} for {'x'.join(map(str, dims))}")
    return dims


def _head(meta: DatasetInfo, param_id: int, path: Path) -> Head:
    raw_name, name = head_name(meta, param_id, path)
    mapping = meta.mappings.get(raw_name)
    if mapping is None:
        if meta.path is not None:
            log.warning("%s: no parameter_mappings entry for %r; using range 0..1", meta.path, raw_name)
        mapping = {"min": 0.0, "max": 1.0}
    description = head_description(raw_name, name, mapping)
    try:
        return Head.quantized(name, float(mapping["min"]), float(mapping["max"]),
                              mapping.get("step"), source_id=param_id, description=description)
    except (KeyError, TypeError, ValueError, SchemaError) as e:
        raise ConversionError(f"{meta.path}: parameter_mappings[{raw_name!r}]: expected min < max "
                              f"and optional step > 0, found {dict(mapping)} ({e})") from e


def read_schema(src: Path, split: str) -> DatasetSchema:
    meta, data = read_metadata(src), _load(src, split)
    h, w, c = _dims(src, meta, data)
    heads = tuple(_head(meta, pid, data.path) for pid in sorted(data.ids))
    if meta.counts.get(split, len(data)) != len(data):
        log.warning("%s: says %d %s samples, %s holds %d", meta.path, meta.counts[split], split,
                    data.path.name, len(data))
    try:
        return DatasetSchema(
            name=meta.dataset_name or src.name, split=split,
            image=ImageSpec(height=h, width=w, channels=c, encoding="raw", layout="CHW"),
            heads=heads, fixed_parameters=meta.fixed,
            provenance=Provenance(source_format=f"vimh-{data.variant}", source_version=meta.version,
                                  source_name=src.name, converter_version=CONVERTER_VERSION))
    except SchemaError as e:
        raise ConversionError(f"{src}: {e}") from e


def count_samples(src: Path, split: str) -> int:
    return len(_load(src, split))


def iter_blocks(src: Path, split: str,
                indices: Sequence[int] | None = None) -> Iterator[SampleBlock]:
    """Blocks of about :data:`BLOCK_BYTES` of pixels; label columns in schema order (heads
    sorted by parameter id); ``_extra`` holds the scale factors when the file has them."""
    data = _load(src, split)
    values = data.values[:, np.argsort(data.ids, kind="stable")]
    order = range(len(data)) if indices is None else indices
    for rows in blocks_of(order, BLOCK_BYTES // max(1, data.images.shape[1])):
        extra = {} if data.scale_factors is None else {"scale_factors": data.scale_factors[rows]}
        yield SampleBlock(indices=rows, images=data.images[rows], labels=values[rows], extra=extra)


@dataclass(frozen=True)
class VimhFormat:
    """The VIMH format (it takes no options)."""

    @property
    def name(self) -> str:
        return NAME

    @property
    def settings(self) -> Mapping[str, Any]:
        return {}

    def splits(self, src: Path) -> tuple[str, ...]:
        return splits(src)

    def read_schema(self, src: Path, split: str) -> DatasetSchema:
        return read_schema(src, split)

    def count_samples(self, src: Path, split: str) -> int:
        return count_samples(src, split)

    def iter_blocks(self, src: Path, split: str, indices: Sequence[int] | None = None) -> Iterator[SampleBlock]:
        return iter_blocks(src, split, indices)
