"""Existing WebDataset shards as a source: ``SRC/*.tar`` (one split, ``--split-name``, default
``train``) or ``SRC/<split>/*.tar``, as ``webdataset.ShardWriter`` or ``tar`` wrote them.

Samples are grouped by WebDataset's rule (the key ends at the first dot after the last
slash), in the order of the tar files (by name) and of their members; sample ``i`` of a
split is the ``i``-th sample kept. Each head is read from a member of the sample: a
``--head NAME=FIELD:CLASSES`` names it, FIELD being a member extension (``cls``: the class
as decimal text) or ``json.<key>`` (an integer under ``key`` in the ``.json`` member). The
image is the sample's ``jpg``/``jpeg`` (JPEG shards) or ``png`` member: RGB images in the
split's encoding (its first image's) pass through, other images (grayscale, RGBA, palette,
CMYK, the other encoding) are re-encoded as RGB in it. A sample without an
image, a head's field or with a class out of range is an error, or skipped
(``on_bad="skip"``, one warning each). The tars are walked by the project's strict tar
reader: a broken tar is an error naming it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import mmap
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import ConversionError, SchemaError, ShardFormatError, quoted
from pipeline.format.bounded_json import load_json
from pipeline.format.schema import DatasetSchema, Head, ImageSpec, Provenance
from pipeline.format.tar_read import iter_members
from shard_tools.formats.base import SampleBlock, blocks_of
from shard_tools.formats.file_cache import latest_per_file
from shard_tools.formats.jpeg_header import jpeg_header
from shard_tools.version import CONVERTER_VERSION

log = logging.getLogger(__name__)

NAME = "webdataset"
ON_BAD = ("error", "skip")
IMAGE_KINDS = {"jpg": "jpg", "jpeg": "jpg", "png": "png"}  # member extension -> encoding
_HEAD = re.compile(r"(?P<name>[A-Za-z][A-Za-z0-9_]*)=(?P<field>[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?):(?P<classes>\d+)")
_MAX_LABEL_BYTES = 1 << 20
FILES_PER_BLOCK = 256


@dataclass(frozen=True)
class HeadField:
    """A head and where a sample holds it: member extension ``field`` (``cls``) or ``json.<key>``."""

    head: str
    field: str
    classes: int

    @classmethod
    def parse(cls, text: str) -> HeadField:
        match = _HEAD.fullmatch(text.strip())
        if match is None or int(match["classes"]) < 1:
            raise ConversionError(f"--head: expected NAME=FIELD:CLASSES (e.g. fine=cls:100 or coarse=json.coarse:20), "
                                  f"found {text!r}")
        return cls(match["name"], match["field"], int(match["classes"]))


@dataclass(frozen=True)
class Options:
    """``heads`` (``NAME=FIELD:CLASSES`` each), ``on_bad`` (error | skip), ``split_name`` (the
    split of a SRC that holds its tar files directly)."""

    heads: tuple[HeadField, ...]
    on_bad: str = "error"
    split_name: str = "train"

    def __post_init__(self) -> None:
        if not self.heads:
            raise ConversionError("webdataset: at least one --head NAME=FIELD:CLASSES is needed")
        names = [h.head for h in self.heads]
        if len(set(names)) != len(names):
            raise ConversionError(f"webdataset: head names must differ, found {names}")
        if self.on_bad not in ON_BAD:
            raise ConversionError(f"webdataset option on_bad: expected {' | '.join(ON_BAD)}, found {self.on_bad!r}")


@dataclass(frozen=True)
class Listing:
    """A split's kept samples: ``tars``, and per sample the tar, where its image lies, the
    image's encoding, and its class per head."""

    tars: tuple[str, ...]
    tar: np.ndarray
    start: np.ndarray
    size: np.ndarray
    kind: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.tar)


def wds_key(name: str) -> tuple[str, str] | None:
    """WebDataset's split of a member name: the key ends at the first dot after the last slash."""
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    return None if dot <= base else (name[:dot], name[dot + 1:])


def _class(fields: Mapping[str, bytes], field: HeadField) -> int:
    """A head's class from a sample's members (KeyError, ValueError or TypeError if it has none)."""
    if field.field.startswith("json."):
        payload = fields["json"]
        if len(payload) > _MAX_LABEL_BYTES:
            raise ValueError(f"a json member of {len(payload)} bytes")
        value = load_json(payload, where="json", error=ConversionError, max_bytes=_MAX_LABEL_BYTES)[field.field[5:]]
    else:
        value = int(fields[field.field].decode("ascii").strip())
    if type(value) is not int or not 0 <= value < field.classes:
        raise ValueError(f"class expected in 0..{field.classes - 1}, found {quoted(value)}")
    return value


class _SplitWalk:
    """Walks a split's tars into a :class:`Listing`, applying ``on_bad`` to bad samples."""

    def __init__(self, options: Options, tars: Sequence[Path]) -> None:
        self.options, self.tars = options, tars
        self.rows: list[tuple[int, int, int, str, list[int]]] = []

    def sample(self, t: int, key: str, members: dict[str, tuple[int, int]], data: bytes) -> None:
        where = f"{self.tars[t]}: sample {key!r}"
        image = next(((ext, members[ext]) for ext in IMAGE_KINDS if ext in members), None)
        try:
            if image is None:
                raise ValueError(f"no image member (expected one of {sorted(IMAGE_KINDS)}; found {sorted(members)})")
            fields = {ext: data[a:a + n] for ext, (a, n) in members.items() if ext not in IMAGE_KINDS}
            labels = [self._labelled(fields, f) for f in self.options.heads]
        except (ValueError, KeyError, TypeError, ConversionError, UnicodeDecodeError) as e:
            if self.options.on_bad == "error":
                raise ConversionError(f"{where}: {e} (on_bad=skip leaves such samples out)") from e
            log.warning("%s: %s: skipped", where, e)
            return
        (ext, (start, size)) = image
        self.rows.append((t, start, size, IMAGE_KINDS[ext], labels))

    @staticmethod
    def _labelled(fields: Mapping[str, bytes], field: HeadField) -> int:
        try:
            return _class(fields, field)
        except KeyError as e:
            raise ValueError(f"no {field.field!r} for head {field.head!r}") from e

    def tar(self, t: int) -> None:
        if not self.tars[t].stat().st_size:
            raise ConversionError(f"{self.tars[t]}: an empty file, not a tar")
        with open(self.tars[t], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            self._walk(t, data)

    def _walk(self, t: int, data: Any) -> None:
        key, members = None, {}
        try:
            for member in iter_members(data, str(self.tars[t])):
                parts = wds_key(member.name) if member.regular else None
                if parts is None:
                    continue  # directories, links, names without an extension: not part of a sample
                if parts[0] != key and key is not None:
                    self.sample(t, key, members, data)
                    members = {}
                key = parts[0]
                members[parts[1].lower()] = (member.start, member.size)
        except ShardFormatError as e:
            raise ConversionError(f"{self.tars[t]}: not a readable tar ({e})") from e
        if key is not None:
            self.sample(t, key, members, data)

    def listing(self) -> Listing:
        for t in range(len(self.tars)):
            self.tar(t)
        rows = self.rows
        return Listing(tuple(map(str, self.tars)), np.array([r[0] for r in rows], np.int64),
                       np.array([r[1] for r in rows], np.int64), np.array([r[2] for r in rows], np.int64),
                       tuple(r[3] for r in rows),
                       np.array([r[4] for r in rows], np.int64).reshape(len(rows), len(self.options.heads)))


@latest_per_file(lambda options, stamp: options)
def _listing(options: Options, stamp: tuple[tuple[str, int, int], ...]) -> Listing:
    """A split's listing, walked once per state of its tar files."""
    return _SplitWalk(options, [Path(path) for path, _, _ in stamp]).listing()


def _tars(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".tar" and p.is_file())


def _reencode(data: bytes, encoding: str, where: str) -> bytes:
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ConversionError(f"{where}: image does not decode ({e})") from e
    out = io.BytesIO()
    rgb.save(out, format="JPEG" if encoding == "jpg" else "PNG", **({"quality": 90} if encoding == "jpg" else {}))
    return out.getvalue()


@dataclass(frozen=True)
class WebDatasetFormat:
    """The format with its options (what :func:`configure` returns)."""

    options: Options

    @property
    def name(self) -> str:
        return NAME

    @property
    def settings(self) -> Mapping[str, Any]:
        return dataclasses.asdict(self.options)

    def splits(self, src: Path) -> tuple[str, ...]:
        if not src.is_dir():
            raise ConversionError(f"{src}: expected a directory of WebDataset .tar files (or of split directories "
                                  f"holding them), found {'a file' if src.exists() else 'nothing'}")
        if _tars(src):
            return (self.options.split_name,)
        found = tuple(sorted(d.name for d in src.iterdir() if d.is_dir() and _tars(d)))
        if not found:
            raise ConversionError(f"{src}: no .tar files, directly or in split directories")
        return found

    def listing(self, src: Path, split: str) -> Listing:
        directory = src if _tars(src) and split == self.options.split_name else src / split
        if not directory.is_dir() or not _tars(directory):
            raise ConversionError(f"{src}: split {split!r}: no .tar files in {directory}")
        stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _tars(directory))
        found = _listing(self.options, stamp)
        if not len(found):
            raise ConversionError(f"{directory}: no usable samples")
        return found

    def read_schema(self, src: Path, split: str) -> DatasetSchema:
        found = self.listing(src, split)
        heads = tuple(Head(name=f.head, kind="class", num_classes=f.classes, description=f"WebDataset field {f.field}")
                      for f in self.options.heads)
        try:
            return DatasetSchema(name=src.name or NAME, split=split,
                                 image=ImageSpec(None, None, 3, encoding=found.kind[0], layout="HWC"), heads=heads,
                                 provenance=Provenance(source_format=NAME, source_name=src.name,
                                                       converter_version=CONVERTER_VERSION))
        except SchemaError as e:
            raise ConversionError(f"{src}: {e}") from e

    def count_samples(self, src: Path, split: str) -> int:
        return len(self.listing(src, split))

    def iter_blocks(self, src: Path, split: str, indices: Sequence[int] | None = None) -> Iterator[SampleBlock]:
        found = self.listing(src, split)
        encoding = found.kind[0]
        order = range(len(found)) if indices is None else indices
        maps: dict[int, Any] = {}
        for rows in blocks_of(order, FILES_PER_BLOCK):
            images = [self._image(found, int(i), encoding, maps) for i in rows.tolist()]
            yield SampleBlock(indices=rows, images=images, labels=found.labels[rows])

    def _image(self, found: Listing, i: int, encoding: str, maps: dict[int, Any]) -> bytes:
        t = int(found.tar[i])
        if t not in maps:
            with open(found.tars[t], "rb") as f:
                maps[t] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        data = bytes(maps[t][int(found.start[i]):int(found.start[i]) + int(found.size[i])])
        if found.kind[i] == encoding and _rgb(data, encoding):
            return data
        return _reencode(data, encoding, f"{found.tars[t]}: sample {i}")


def _rgb(data: bytes, encoding: str) -> bool:
    """Whether ``data`` is an RGB image in ``encoding`` (``jpg`` or ``png``), kept byte for byte;
    anything else (grayscale, RGBA, palette, CMYK, not that format) is re-encoded."""
    header = jpeg_header(data) if encoding == "jpg" else None
    if header is not None:
        return header[0] == "RGB"
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format == ("JPEG" if encoding == "jpg" else "PNG") and image.mode == "RGB"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def configure(heads: Sequence[str] | None = None, on_bad: str = "error", split_name: str = "train",
              **unknown: Any) -> WebDatasetFormat:
    """The format with its options; ``heads`` as ``NAME=FIELD:CLASSES`` strings."""
    if unknown:
        raise ConversionError(f"webdataset: unknown option(s) {sorted(unknown)}; expected heads, on_bad, split_name")
    return WebDatasetFormat(Options(tuple(HeadField.parse(h) for h in heads or ()), on_bad=on_bad,
                                    split_name=split_name))
