"""ImageNet-100 source format (``docs/sources/imagenet100.md``): ``SRC/train/<wnid>/*.JPEG``
and ``SRC/val/<wnid>/*.JPEG``. A class list (the CMC list by default, the H-JEPA list or a
file) picks the 100 classes; labels are positions in the list, in one class head ``label``.

JPEGs pass through byte-for-byte unless ``resize`` is set. Listing a split reads only its
directories: sample ``i`` is the ``i``-th file (by label, then name), whatever it holds.
Each file is read once, when its sample is written, and classified from the bytes in
hand (:func:`probe_bytes`); a file that is not an RGB JPEG is re-encoded, skipped or an
error (``on_bad``), with one warning per file, and a skipped file leaves its shard one
sample shorter. :func:`configure` gives the format object with its options."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import ConversionError, SchemaError
from pipeline.format.schema import DatasetSchema, FixedParameter, Head, ImageSpec, Provenance
from shard_tools.formats.base import SampleBlock, blocks_of
from shard_tools.formats.imagenet100.class_lists import BUILTIN_LISTS, ClassList, load_class_list
from shard_tools.formats.jpeg_header import jpeg_header
from shard_tools.version import CONVERTER_VERSION

log = logging.getLogger(__name__)

NAME = "imagenet100"
SOURCE_FORMAT = "imagenet-folder"
SPLITS = ("train", "val")
ON_BAD = ("convert", "skip", "error")
EXTENSIONS = (".jpeg", ".jpg")
DEFAULT_QUALITY = 90
IMAGE = ImageSpec(height=None, width=None, channels=3, encoding="jpg", layout="HWC")
OK, NOT_RGB, NOT_JPEG, UNREADABLE = "ok", "not RGB", "not a JPEG", "unreadable"
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
FILES_PER_BLOCK = 64  # files read per block of samples


@dataclass(frozen=True)
class Options:
    """``class_list`` (cmc, hjepa or a file), ``resize`` (shorter side in pixels, None: keep
    the JPEGs as they are), ``quality`` (of re-encoded JPEGs), ``on_bad`` (convert|skip|error)."""

    class_list: str = "cmc"
    resize: int | None = None
    quality: int = DEFAULT_QUALITY
    on_bad: str = "convert"

    def __post_init__(self) -> None:
        def bad(what: str, expected: str, found: object) -> ConversionError:
            return ConversionError(f"imagenet100 option {what}: expected {expected}, found {found!r}")
        if not isinstance(self.class_list, (str, os.PathLike)) or not str(self.class_list):
            raise bad("class_list", f"{' | '.join(BUILTIN_LISTS)} | a file", self.class_list)
        object.__setattr__(self, "class_list", str(self.class_list))
        if self.resize is not None and not (_is_int(self.resize) and self.resize >= 1):
            raise bad("resize", "a shorter side of >= 1 pixels or None", self.resize)
        if not (_is_int(self.quality) and 1 <= self.quality <= 100):
            raise bad("quality", "a JPEG quality in 1..100", self.quality)
        if self.on_bad not in ON_BAD:
            raise bad("on_bad", " | ".join(ON_BAD), self.on_bad)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Probe:
    """What Pillow says of a file from its header: ``kind`` (OK, NOT_RGB, NOT_JPEG or
    UNREADABLE), a ``detail`` for the log and the ``size`` (width, height)."""

    kind: str
    detail: str = ""
    size: tuple[int, int] = (0, 0)


def probe(file: str | Path | io.BytesIO) -> Probe:
    """Classify an image without decoding its pixels: what Pillow says of its header.
    :func:`probe_bytes` gives the same answers, faster."""
    try:
        with Image.open(file) as image:
            fmt, mode, size = image.format, image.mode, image.size
    except _PIL_ERRORS as e:
        return Probe(UNREADABLE, f"{type(e).__name__}: {e}")
    if fmt != "JPEG":
        return Probe(NOT_JPEG, f"a {fmt} file", size)
    if mode != "RGB":
        return Probe(NOT_RGB, f"mode {mode}", size)
    return Probe(OK, "", size)


def _fast(data: bytes) -> Probe | None:
    """:func:`probe`'s answer from the JPEG header in ``data``, or None: ask Pillow."""
    header = jpeg_header(data)
    if header is None:
        return None
    mode, size = header
    return Probe(OK, "", size) if mode == "RGB" else Probe(NOT_RGB, f"mode {mode}", size)


def probe_bytes(data: bytes) -> Probe:
    """:func:`probe` of a whole file's bytes; Pillow opens only what the fast JPEG header
    walk (:mod:`~shard_tools.formats.jpeg_header`) leaves undecided."""
    found = _fast(data)
    return probe(io.BytesIO(data)) if found is None else found


@dataclass(frozen=True)
class SplitFiles:
    """A split's image files in sample order (label, then file name) and their labels."""

    root: Path
    paths: tuple[str, ...]  # strings, not Path objects: a split can hold a million
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def _stamp(root: Path, wnids: Sequence[str]) -> tuple[int, ...]:
    """Modification times of the split directory and its class directories (the cache key)."""
    return tuple(p.stat().st_mtime_ns if p.is_dir() else -1 for p in (root, *(root / w for w in wnids)))


def _image_names(directory: Path) -> list[str]:
    """The image files of one class directory, in name order."""
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".")
                      and os.path.splitext(e.name)[1].lower() in EXTENSIONS and e.is_file())


_LISTED: dict[tuple[Path, ClassList, tuple[int, ...]], SplitFiles] = {}  # the last few listings
_KEEP_LISTED = 8


def _cached_listing(root: Path, classes: ClassList) -> SplitFiles:
    """:func:`_list` once per state of the split's directories (their mtimes are the key)."""
    key = (root, classes, _stamp(root, classes.wnids))
    if key not in _LISTED:
        _LISTED[key] = _list(root, classes)
        while len(_LISTED) > _KEEP_LISTED:
            del _LISTED[next(iter(_LISTED))]
    return _LISTED[key]


def _list(root: Path, classes: ClassList) -> SplitFiles:
    """Every image file of a split, in sample order; missing class directories are an error."""
    missing = [w for w in classes.wnids if not (root / w).is_dir()]
    if missing:
        raise ConversionError(f"{root}: {len(missing)} of the {len(classes.wnids)} classes of the {classes.source} "
                              f"class list have no directory: {', '.join(missing)}")
    listed = set(classes.wnids)
    extra = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in listed)
    if extra:
        log.info("%s: ignoring %d directories not in the %s class list: %s", root, len(extra), classes.source,
                 ", ".join(extra[:10]) + (", ..." if len(extra) > 10 else ""))
    paths: list[str] = []
    labels: list[int] = []
    for label, wnid in enumerate(classes.wnids):
        directory = os.path.join(root, wnid)
        names = _image_names(Path(directory))
        paths.extend(os.path.join(directory, name) for name in names)
        labels.extend([label] * len(names))
    if not paths:
        raise ConversionError(f"{root}: no images: expected *.JPEG files under <wnid>/ directories")
    return SplitFiles(root, tuple(paths), np.array(labels, dtype=np.int64))


def _bad_file_error(path: str, index: int, found: Probe) -> ConversionError:
    return ConversionError(f"{path}: {found.kind} ({found.detail}); on_bad='error' refuses it (sample {index}; "
                           "on_bad='convert' re-encodes bad files as RGB JPEGs, 'skip' leaves them out, and "
                           "either warns once per bad file)")


def shorter_side(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter side is ``side`` pixels."""
    width, height = size
    if width <= height:
        return side, max(1, round(height * side / width))
    return max(1, round(width * side / height)), side


@dataclass(frozen=True)
class ImageNet100:
    """The format with its options (what :func:`configure` returns)."""

    options: Options
    classes: ClassList

    @property
    def name(self) -> str:
        return NAME

    @property
    def settings(self) -> Mapping[str, Any]:
        return dataclasses.asdict(self.options)

    def splits(self, src: Path) -> tuple[str, ...]:
        if not src.is_dir():
            raise ConversionError(f"{src}: expected an ImageNet directory (train/ and/or val/ with one "
                                  f"directory of JPEGs per wnid), found {'a file' if src.exists() else 'nothing'}")
        present = tuple(s for s in SPLITS if (src / s).is_dir())
        if not present:
            found = sorted(p.name for p in src.iterdir())[:10]
            raise ConversionError(f"{src}: expected train/ and/or val/ (one directory of JPEGs per wnid), "
                                  f"found {found}")
        return present

    def files(self, src: Path, split: str) -> SplitFiles:
        """The split's image files, listed once per state of its directories."""
        if split not in SPLITS:
            raise ConversionError(f"{src}: unknown split {split!r}; ImageNet has {list(SPLITS)}")
        root = src / split
        if not root.is_dir():
            raise ConversionError(f"{root}: split {split!r}: no such directory")
        return _cached_listing(root, self.classes)

    def read_schema(self, src: Path, split: str) -> DatasetSchema:
        self.files(src, split)
        cl, opts = self.classes, self.options
        fixed = () if opts.resize is None else (
            FixedParameter("resize_shorter_side", opts.resize, "pixels; images re-encoded as JPEG"),
            FixedParameter("jpeg_quality", opts.quality, "of re-encoded images"))
        try:
            head = Head(name="label", kind="class", num_classes=len(cl.wnids), class_names=cl.names,
                        description=f"ImageNet class: position in the {cl.source} class list")
            return DatasetSchema(name=src.name or NAME, split=split, image=IMAGE, heads=(head,),
                                 fixed_parameters=fixed,
                                 provenance=Provenance(source_format=SOURCE_FORMAT, source_version=cl.source,
                                                       source_name=src.name, converter_version=CONVERTER_VERSION))
        except SchemaError as e:
            raise ConversionError(f"{src}: {e}") from e

    def count_samples(self, src: Path, split: str) -> int:
        return len(self.files(src, split))

    def iter_blocks(self, src: Path, split: str,
                    indices: Sequence[int] | None = None) -> Iterator[SampleBlock]:
        """Blocks of :data:`FILES_PER_BLOCK` files, each read once and checked as it is read;
        a block leaves out the files ``on_bad`` skips."""
        files = self.files(src, split)
        order = range(len(files)) if indices is None else indices
        for rows in blocks_of(order, FILES_PER_BLOCK):
            if len(rows) and rows.max() >= len(files):
                raise ConversionError(f"{files.root}: sample {rows.max()} planned, but the split lists {len(files)} "
                                      "files now; did it change during the conversion? Convert again")
            kept, images = [], []
            for i in rows.tolist():
                image = self.image(files, i)
                if image is not None:
                    kept.append(i)
                    images.append(image)
            kept_rows = np.array(kept, dtype=np.int64)
            yield SampleBlock(indices=kept_rows, images=images, labels=files.labels[kept_rows][:, None],
                              requested=len(rows))

    def image(self, files: SplitFiles, index: int) -> bytes | None:
        """Sample ``index``'s JPEG: the file's bytes, or re-encoded (bad files, ``resize``);
        None for a file ``on_bad`` skips (with a warning)."""
        path = files.paths[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConversionError(f"{path}: sample {index}: cannot read it ({e})") from e
        found = probe_bytes(data)
        side, on_bad = self.options.resize, self.options.on_bad
        if found.kind == OK:
            return data if side is None or min(found.size) == side else self._encode(data, path, index, found)
        if on_bad == "error":
            raise _bad_file_error(path, index, found)
        if on_bad == "skip" or found.kind == UNREADABLE:
            log.warning("%s: %s (%s): skipped", path, found.kind, found.detail)
            return None
        log.warning("%s: %s (%s): re-encoded as an RGB JPEG", path, found.kind, found.detail)
        return self._encode(data, path, index, found)

    def _encode(self, data: bytes, path: str, index: int, found: Probe) -> bytes:
        side = self.options.resize
        target = found.size if side is None else shorter_side(found.size, side)
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.format == "JPEG":
                    image.draft("RGB", target)  # DCT scaling: decode no larger than needed
                rgb = image.convert("RGB")
        except _PIL_ERRORS as e:
            raise ConversionError(f"{path}: sample {index}: cannot decode it ({e})") from e
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=self.options.quality)
        return out.getvalue()


def configure(**options: Any) -> ImageNet100:
    """The format with ``options`` (see :class:`Options`); unknown names are an error."""
    try:
        opts = Options(**options)
    except TypeError as e:
        raise ConversionError(f"imagenet100: unknown option(s) in {sorted(options)}; expected "
                              "class_list, resize, quality, on_bad") from e
    return ImageNet100(opts, load_class_list(opts.class_list))
