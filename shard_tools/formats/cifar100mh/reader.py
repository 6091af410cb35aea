"""CIFAR-100-MH source format, in either of two layouts (``docs/sources/cifar100mh.md``):

- **CIFAR-100-MH**: ``train_batch``/``test_batch`` pickles in VIMH's layout (``data`` and
  ``[N, id, value, ...]`` label lists under ``cifar100mh_labels`` or ``labels``) plus
  ``cifar100mh_dataset_info.json`` (else ``vimh_dataset_info.json``). Every head is a
  class head of ``max - min + 1`` classes and the stored value *is* the class index
  (``min`` is not subtracted).
- **CIFAR-100 python release**: ``train``/``test`` pickles (``data``, ``fine_labels``,
  ``coarse_labels``) and ``meta`` (label names): heads ``fine`` and ``coarse``.

Pixels are planar CHW rows, kept byte-for-byte. The pickle reader
(:mod:`shard_tools.formats.mh_pickles`) and the ``*_dataset_info.json`` layer
(:mod:`shard_tools.formats.dataset_info`) are shared with VIMH.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConversionError, SchemaError
from pipeline.format.schema import DatasetSchema, Head, ImageSpec, Provenance
from shard_tools.formats.base import BLOCK_BYTES, SampleBlock, blocks_of
from shard_tools.formats.dataset_info import DatasetInfo, head_description, head_name, read_dataset_info
from shard_tools.formats.file_cache import latest_per_file
from shard_tools.formats.mh_pickles import PickleKind, load_pickle, read_pickle, stat_key
from shard_tools.version import CONVERTER_VERSION

log = logging.getLogger(__name__)

NAME = "cifar100mh"
MH_FILES = {"train": "train_batch", "test": "test_batch"}
STANDARD_FILES = {"train": "train", "test": "test"}
META_FILE = "meta"
METADATA_FILES = ("cifar100mh_dataset_info.json", "vimh_dataset_info.json")
MH_PICKLE = PickleKind(what="CIFAR-100-MH", label_keys=("cifar100mh_labels", "labels"), max_value=None)
CIFAR_DIMS = (32, 32, 3)
STANDARD_HEADS = (("fine", "fine_labels", "fine_label_names"),
                  ("coarse", "coarse_labels", "coarse_label_names"))
_DIMS = re.compile(r"^(\d+)x(\d+)x(\d+)$")
Dims = tuple[int, int, int]


@dataclass(frozen=True)
class CifarSplit:
    """One split, whichever the layout: ``images`` ``(n, H*W*C)`` uint8 planar CHW rows,
    ``labels`` ``(n, heads)`` class indices in ``schema`` head order, checked in range."""

    path: Path
    schema: DatasetSchema
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def layout(src: Path) -> str:
    """``"mh"`` or ``"standard"``: which layout ``src`` holds (an error when neither or both)."""
    if not src.exists():
        raise ConversionError(f"{src}: no such directory (expected a CIFAR-100-MH or CIFAR-100 directory)")
    if not src.is_dir():
        raise ConversionError(f"{src}: expected a CIFAR-100-MH or CIFAR-100 directory, found a file")
    mh = [f for f in MH_FILES.values() if (src / f).is_file()]
    standard = [f for f in STANDARD_FILES.values() if (src / f).is_file()]
    if mh and standard:
        raise ConversionError(f"{src}: holds both layouts ({mh} and {standard}); expected one of them")
    if not mh and not standard:
        found = sorted(p.name for p in src.iterdir())[:10]
        raise ConversionError(
            f"{src}: neither layout: expected CIFAR-100-MH ({' and/or '.join(MH_FILES.values())} with "
            f"{' or '.join(METADATA_FILES)}) or the CIFAR-100 python release "
            f"({' and/or '.join(STANDARD_FILES.values())} with {META_FILE}), found {found}")
    return "mh" if mh else "standard"


def _files(src: Path) -> Mapping[str, str]:
    return MH_FILES if layout(src) == "mh" else STANDARD_FILES


def splits(src: Path) -> tuple[str, ...]:
    files = _files(src)
    return tuple(s for s, f in files.items() if (src / f).is_file())


def _load(src: Path, split: str) -> CifarSplit:
    """One split of either layout, every label checked against its head's class count;
    loaded once per state of its files (every worker process calls this per shard)."""
    files = _files(src)
    if split not in files:
        raise ConversionError(f"{src}: unknown split {split!r}; CIFAR-100 has {list(files)}")
    path = src / files[split]
    if not path.is_file():
        raise ConversionError(f"{src}: split {split!r}: expected {path.name}, found no such file")
    described_by = tuple(stat_key(src / name) for name in (*METADATA_FILES, META_FILE) if (src / name).is_file())
    return _load_checked(src, split, stat_key(path), described_by)


@latest_per_file(lambda src, split, *state: (src, split))
def _load_checked(src: Path, split: str, key: tuple[str, int, int],
                  described_by: tuple[tuple[str, int, int], ...]) -> CifarSplit:
    """:func:`_load` of the files as they are at ``key`` and ``described_by``."""
    path = Path(key[0])
    data = _load_mh(src, split, path) if _files(src) is MH_FILES else _load_standard(src, split, path)
    limits = np.array([h.num_classes for h in data.schema.heads])
    bad = np.argwhere((data.labels < 0) | (data.labels >= limits))  # row-major: first sample first
    if len(bad):
        i, j = (int(x) for x in bad[0])
        head = data.schema.heads[j]
        raise ConversionError(f"{path}: sample {i}: head {head.name!r} expected a class index in "
                              f"0..{head.num_classes - 1}, found {int(data.labels[i, j])}")
    return data


def _nonempty(path: Path, n: int) -> None:
    if n == 0:
        raise ConversionError(f"{path}: empty dataset: no samples")


# --- CIFAR-100-MH layout ---------------------------------------------------------------

def _metadata(src: Path) -> DatasetInfo:
    for name in METADATA_FILES:
        if (src / name).is_file():
            if name != METADATA_FILES[0]:
                log.info("%s: no %s; using %s", src, METADATA_FILES[0], name)
            return read_dataset_info(src, name)
    raise ConversionError(f"{src}: expected {' or '.join(METADATA_FILES)} (class counts come from its "
                          "parameter_mappings), found neither")


def _class_head(meta: DatasetInfo, param_id: int, path: Path) -> Head:
    raw_name, name = head_name(meta, param_id, path)
    mapping = meta.mappings.get(raw_name)
    if mapping is None:
        raise ConversionError(f"{meta.path}: parameter_mappings: expected an entry for {raw_name!r} "
                              f"(parameter id {param_id}) with min and max, found none")
    lo: Any = mapping.get("min")
    hi: Any = mapping.get("max")
    if not (_is_integral(lo) and _is_integral(hi) and lo <= hi):
        raise ConversionError(f"{meta.path}: parameter_mappings[{raw_name!r}]: expected integer min <= max, "
                              f"found min {lo!r}, max {hi!r}")
    try:
        return Head(name=name, kind="class", num_classes=int(hi) - int(lo) + 1,
                    source_id=param_id, description=head_description(raw_name, name, mapping))
    except SchemaError as e:
        raise ConversionError(f"{meta.path}: parameter {raw_name!r}: {e}") from e


def _is_integral(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and float(value).is_integer())


def _mh_dims(src: Path, meta: DatasetInfo, path: Path, pickled: Dims | None, row: int) -> Dims:
    """Dimensions on which the JSON and the pickle agree (32x32x3 when neither says)."""
    known = {str(where): d for where, d in ((meta.path, meta.dims), (path, pickled)) if d is not None}
    if len(set(known.values())) > 1:
        said = ", ".join(f"{where} says {'x'.join(map(str, d))}" for where, d in known.items())
        raise ConversionError(f"{src}: image dimensions (HxWxC) disagree: {said}")
    dims = next(iter(known.values()), CIFAR_DIMS)
    _check_row(path, dims, row)
    return dims


def _check_row(path: Path, dims: Dims, row: int) -> None:
    if row != dims[0] * dims[1] * dims[2]:
        raise ConversionError(f"{path}: sample 0: image has {row} bytes, expected H*W*C = "
                              f"{dims[0] * dims[1] * dims[2]} for {'x'.join(map(str, dims))}")


def _load_mh(src: Path, split: str, path: Path) -> CifarSplit:
    meta, data = _metadata(src), load_pickle(path, MH_PICKLE)
    _nonempty(path, len(data))
    h, w, c = _mh_dims(src, meta, path, data.dims, data.images.shape[1])
    order = np.argsort(data.ids, kind="stable")
    heads = tuple(_class_head(meta, data.ids[k], path) for k in order)
    if meta.counts.get(split, len(data)) != len(data):
        log.warning("%s: says %d %s samples, %s holds %d", meta.path, meta.counts[split], split,
                    path.name, len(data))
    schema = _schema(src, split, meta.dataset_name or src.name, ImageSpec(h, w, c, "raw", "CHW"), heads,
                     "cifar100mh-pickle", meta.version)
    return CifarSplit(path, schema, data.images, data.values[:, order].astype(np.int64))


# --- CIFAR-100 python release layout ---------------------------------------------------

def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _read_dict(path: Path, wanted: Sequence[str]) -> dict[str, Any]:
    """A release pickle as a dict with str keys (the release's keys may be bytes)."""
    content = read_pickle(path, "CIFAR-100", encoding="bytes")
    if not isinstance(content, dict):
        raise ConversionError(f"{path}: expected a dict with {list(wanted)}, found {type(content).__name__}")
    batch = {_text(k): v for k, v in content.items()}
    missing = [k for k in wanted if k not in batch]
    if missing:
        raise ConversionError(f"{path}: expected a dict with {list(wanted)}, missing {missing} "
                              f"(found keys {sorted(map(str, batch))})")
    return batch


@latest_per_file(lambda key: key[0])
def _read_release_split(key: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A release split's images and ``(n, 2)`` fine and coarse labels, unchecked ranges."""
    path = Path(key[0])
    batch = _read_dict(path, ["data", *(labels for _, labels, _ in STANDARD_HEADS)])
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2:
        raise ConversionError(f"{path}: 'data' expected uint8 of shape (n, 3072), "
                              f"found {data.dtype} of shape {data.shape}")
    columns = []
    for _, key_name, _ in STANDARD_HEADS:
        try:
            column = np.asarray(batch[key_name])
        except (ValueError, TypeError, OverflowError):
            column = np.zeros(0, dtype=object)
        if column.ndim != 1 or len(column) != len(data) or (len(column) and column.dtype.kind not in "iu"):
            raise ConversionError(f"{path}: {key_name!r} expected {len(data)} integers (one per row of "
                                  f"'data'), found {len(column) if column.ndim else 0} of {column.dtype}")
        columns.append(column.astype(np.int64))
    return data, np.stack(columns, axis=1)


def _class_names(src: Path) -> dict[str, tuple[str, ...]]:
    path = src / META_FILE
    if not path.is_file():
        raise ConversionError(f"{path}: missing; the CIFAR-100 python layout needs it for "
                              f"{[names for _, _, names in STANDARD_HEADS]}")
    meta = _read_dict(path, [names for _, _, names in STANDARD_HEADS])
    out = {}
    for _, _, key in STANDARD_HEADS:
        names = meta[key]
        if not isinstance(names, (list, tuple)) or not names or \
                not all(isinstance(_text(n), str) for n in names):
            raise ConversionError(f"{path}: {key!r} expected a non-empty list of names, found {names!r:.80}")
        out[key] = tuple(_text(n) for n in names)
    return out


def _load_standard(src: Path, split: str, path: Path) -> CifarSplit:
    names = _class_names(src)
    images, labels = _read_release_split(stat_key(path))
    _nonempty(path, len(images))
    _check_row(path, CIFAR_DIMS, images.shape[1])
    heads = tuple(Head(name=name, kind="class", num_classes=len(names[key]), class_names=names[key],
                       description=f"CIFAR-100 {name} label") for name, _, key in STANDARD_HEADS)
    schema = _schema(src, split, src.name, ImageSpec(*CIFAR_DIMS, encoding="raw", layout="CHW"), heads,
                     "cifar100-python", "")
    return CifarSplit(path, schema, images, labels)


# --- the SourceFormat functions --------------------------------------------------------

def _schema(src: Path, split: str, name: str, image: ImageSpec, heads: tuple[Head, ...],
            source_format: str, version: str) -> DatasetSchema:
    try:
        return DatasetSchema(name=name, split=split, image=image, heads=heads,
                             provenance=Provenance(source_format=source_format, source_version=version,
                                                   source_name=src.name, converter_version=CONVERTER_VERSION))
    except SchemaError as e:
        raise ConversionError(f"{src}: {e}") from e


def read_schema(src: Path, split: str) -> DatasetSchema:
    return _load(src, split).schema


def count_samples(src: Path, split: str) -> int:
    return len(_load(src, split))


def iter_blocks(src: Path, split: str,
                indices: Sequence[int] | None = None) -> Iterator[SampleBlock]:
    """Blocks of about :data:`BLOCK_BYTES` of pixels; label columns in schema order."""
    data = _load(src, split)
    order = range(len(data)) if indices is None else indices
    for rows in blocks_of(order, BLOCK_BYTES // max(1, data.images.shape[1])):
        yield SampleBlock(indices=rows, images=data.images[rows], labels=data.labels[rows])


@dataclass(frozen=True)
class Cifar100MhFormat:
    """The CIFAR-100-MH format, either layout (it takes no options)."""

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
