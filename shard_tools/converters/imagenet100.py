"""ImageNet-100 source format (``docs/sources/imagenet100.md``): ``SRC/train/<wnid>/*.JPEG``
and ``SRC/val/<wnid>/*.JPEG``. A class list (the CMC list by default, the H-JEPA list or a
file) picks the 100 classes; labels are positions in the list, in one class head ``label``.

JPEGs pass through byte-for-byte unless ``resize`` is set. Every file is classified when a
split is first scanned (from its header only: :func:`probe`), so files that are not RGB
JPEGs are converted, skipped or an error (``on_bad``) before anything is written, and
counts and sample indices are fixed. Options come through :func:`configure`; the module-level
functions are the format with default options.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import ConversionError, SchemaError
from pipeline.schema import DatasetSchema, FixedParameter, Head, ImageSpec, Provenance
from shard_tools import __version__
from shard_tools.converters import BLOCK_BYTES, SampleBlock, blocks_of
from shard_tools.converters.class_lists import BUILTIN_LISTS, ClassList, load_class_list
from shard_tools.converters.jpeg_header import jpeg_header

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
HEAD_BYTES = 16384  # what the scan reads of a file first; the rest only if its header is longer


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
    :func:`probe_bytes` and :func:`probe_file` give the same answers, faster."""
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
    walk (:mod:`~shard_tools.converters.jpeg_header`) leaves undecided."""
    found = _fast(data)
    return probe(io.BytesIO(data)) if found is None else found


def probe_file(path: str | Path) -> tuple[Probe, int]:
    """:func:`probe` of a file and its size in bytes, reading only its first
    :data:`HEAD_BYTES` when the JPEG header ends there."""
    try:
        with open(path, "rb") as f:
            data = f.read(HEAD_BYTES)
            found = _fast(data)
            if found is None and len(data) == HEAD_BYTES:
                data += f.read()
                found = _fast(data)
            if found is not None:
                return found, os.fstat(f.fileno()).st_size
    except OSError:
        pass  # Pillow fails the same way and says why
    found = probe(path)
    return found, (0 if found.kind == UNREADABLE else os.stat(path).st_size)


@dataclass(frozen=True)
class SplitFiles:
    """A split's kept files in sample order (label, then file name), with each file's
    label and :class:`Probe` kind; ``nbytes`` is their total size."""

    root: Path
    paths: tuple[str, ...]  # strings, not Path objects: a split can hold a million
    labels: np.ndarray
    kinds: tuple[str, ...]
    nbytes: int

    def __len__(self) -> int:
        return len(self.paths)


def _stamp(root: Path, wnids: Sequence[str]) -> tuple[int, ...]:
    """Modification times of the split directory and its class directories (the cache key)."""
    return tuple(p.stat().st_mtime_ns if p.is_dir() else -1 for p in (root, *(root / w for w in wnids)))


def _probe_class(directory: Path) -> list[tuple[str, str, str, int]]:
    """(file name, kind, detail, size) from :func:`probe_file` of every image file of one
    class directory, in name order (plain tuples: cheap to send back from a pool worker)."""
    names = sorted(e.name for e in os.scandir(directory)
                   if e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in EXTENSIONS)
    probed = []
    for name in names:
        found, nbytes = probe_file(os.path.join(directory, name))
        probed.append((name, found.kind, found.detail, nbytes))
    return probed


Probed = list[tuple[str, str, str, int]]
MapFn = Callable[[Callable[[Path], Probed], list[Path]], Iterable[Probed]]
_SCANS: dict[tuple[Path, ClassList, str, tuple[int, ...]], SplitFiles] = {}  # the last few scans
_KEEP_SCANS = 8


def _cached_scan(root: Path, classes: ClassList, on_bad: str, map_fn: MapFn = map) -> SplitFiles:
    """:func:`_scan` once per state of the split's directories (their mtimes are the key)."""
    key = (root, classes, on_bad, _stamp(root, classes.wnids))
    if key not in _SCANS:
        _SCANS[key] = _scan(root, classes, on_bad, map_fn)
        while len(_SCANS) > _KEEP_SCANS:
            del _SCANS[next(iter(_SCANS))]
    return _SCANS[key]


def _scan(root: Path, classes: ClassList, on_bad: str, map_fn: MapFn = map) -> SplitFiles:
    """List and classify every file of a split (``map_fn`` over the class directories:
    a process pool's ``map`` classifies them in parallel)."""
    missing = [w for w in classes.wnids if not (root / w).is_dir()]
    if missing:
        raise ConversionError(f"{root}: {len(missing)} of the {len(classes.wnids)} classes of the {classes.source} "
                              f"class list have no directory: {', '.join(missing)}")
    listed = set(classes.wnids)
    extra = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in listed)
    if extra:
        log.info("%s: ignoring %d directories not in the %s class list: %s", root, len(extra), classes.source,
                 ", ".join(extra[:10]) + (", ..." if len(extra) > 10 else ""))
    kept: list[tuple[str, int, str, int]] = []
    bad: list[tuple[str, Probe]] = []
    directories = [root / wnid for wnid in classes.wnids]
    for label, (directory, probed) in enumerate(zip(directories, map_fn(_probe_class, directories), strict=True)):
        for name, kind, detail, nbytes in probed:
            path = os.path.join(directory, name)
            if kind != OK:
                bad.append((path, Probe(kind, detail)))
            if kind == OK or (on_bad == "convert" and kind != UNREADABLE):
                kept.append((path, label, kind, nbytes))
    _report(root, on_bad, bad, len(kept))
    if not kept:
        raise ConversionError(f"{root}: no images: expected *.JPEG files under <wnid>/ directories")
    return SplitFiles(root, tuple(k[0] for k in kept), np.array([k[1] for k in kept], dtype=np.int64),
                      tuple(k[2] for k in kept), sum(k[3] for k in kept))


def _report(root: Path, on_bad: str, bad: Sequence[tuple[str, Probe]], kept: int) -> None:
    """One warning per bad file and a summary; ConversionError for on_bad='error'."""
    if not bad:
        return
    if on_bad == "error":
        path, found = bad[0]
        raise ConversionError(f"{path}: {found.kind} ({found.detail}); on_bad='error' refuses it "
                              f"({len(bad)} bad file(s) under {root}; on_bad='convert' re-encodes them as "
                              "RGB JPEGs, 'skip' leaves them out)")
    converted = 0
    for path, found in bad:
        convert = on_bad == "convert" and found.kind != UNREADABLE
        converted += convert
        log.warning("%s: %s (%s): %s", path, found.kind, found.detail,
                    "re-encoded as an RGB JPEG" if convert else "skipped")
    log.warning("%s: %d bad file(s): %d re-encoded, %d skipped; %d samples", root, len(bad), converted,
                len(bad) - converted, kept)


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
    def NAME(self) -> str:
        return NAME

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

    def files(self, src: Path, split: str, map_fn: MapFn = map) -> SplitFiles:
        """The split's kept files, scanned and classified once per state of its directories
        (``map_fn``: how the class directories are mapped; see :func:`_scan`)."""
        if split not in SPLITS:
            raise ConversionError(f"{src}: unknown split {split!r}; ImageNet has {list(SPLITS)}")
        root = src / split
        if not root.is_dir():
            raise ConversionError(f"{root}: split {split!r}: no such directory")
        return _cached_scan(root, self.classes, self.options.on_bad, map_fn)

    def prescan(self, src: Path, split: str, map_fn: MapFn) -> None:
        """Scan a split with ``map_fn`` (a pool's ``map``) so that later calls find it done."""
        self.files(src, split, map_fn)

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
                                                       source_name=src.name, converter_version=__version__))
        except SchemaError as e:
            raise ConversionError(f"{src}: {e}") from e

    def count_samples(self, src: Path, split: str) -> int:
        return len(self.files(src, split))

    def iter_blocks(self, src: Path, split: str,
                    indices: Sequence[int] | None = None) -> Iterator[SampleBlock]:
        """Blocks of about :data:`BLOCK_BYTES` of source JPEGs; each file checked as it is read."""
        files = self.files(src, split)
        order = range(len(files)) if indices is None else indices
        for rows in blocks_of(order, BLOCK_BYTES * len(files) // max(1, files.nbytes)):
            images = [self.image(files, int(i)) for i in rows]
            yield SampleBlock(indices=rows, images=images, labels=files.labels[rows][:, None])

    def image(self, files: SplitFiles, index: int) -> bytes:
        """Sample ``index``'s JPEG: the file's bytes, or re-encoded (bad files, ``resize``)."""
        path, kind = files.paths[index], files.kinds[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConversionError(f"{path}: sample {index}: cannot read it ({e})") from e
        found = probe_bytes(data)
        if found.kind != kind:
            raise ConversionError(f"{path}: sample {index}: was {kind!r} when the split was scanned, now "
                                  f"{found.kind!r} ({found.detail}); did it change? Convert again")
        side = self.options.resize
        if kind == OK and (side is None or min(found.size) == side):
            return data
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


@functools.cache
def _default() -> ImageNet100:
    return configure()


def splits(src: Path) -> tuple[str, ...]:
    return _default().splits(src)


def read_schema(src: Path, split: str) -> DatasetSchema:
    return _default().read_schema(src, split)


def count_samples(src: Path, split: str) -> int:
    return _default().count_samples(src, split)


def prescan(src: Path, split: str, map_fn: MapFn) -> None:
    _default().prescan(src, split, map_fn)


def iter_blocks(src: Path, split: str, indices: Sequence[int] | None = None) -> Iterator[SampleBlock]:
    return _default().iter_blocks(src, split, indices)
