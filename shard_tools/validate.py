"""The shard validator: reads every shard of a set once and reports every problem found.

Checked: tar structure and end-of-archive marker; ``__header__`` present, first and equal
across a split (and to the manifest's schema); every sample complete (image + labels),
keys unique across a split; every label within its head's range; with ``decode``, every
image decodes to the declared shape; counts, sizes and sha256 against the manifest.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import braceexpand
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.errors import PipelineError, ShardFormatError, quoted
from pipeline.format.header import HEADER_MEMBER, parse_header_json
from pipeline.format.label_columns import LABELS_MEMBER, decode_label_columns
from pipeline.format.labels import decode_labels, label_problems
from pipeline.format.manifest import ShardInfo
from pipeline.format.schema import DatasetSchema
from pipeline.format.tar_read import BLOCK, Member, iter_members, member_key
from pipeline.io.shard_sets import ShardSet, resolve_shards
from pipeline.io.storage import filesystem, read_shard

LABELS_EXT = "labels.msgpack"


@dataclass(frozen=True)
class Problem:
    shard: str
    member: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.member + ': ' if self.member else ''}{self.reason}"


@dataclass
class ValidationReport:
    problems: list[Problem] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    # samples by split label: the split's name ("train"), or, when several sources are validated together
    # or split names repeat, its directory as the source names it ("data/shards/vimh/train"); they add up to samples
    splits: dict[str, int] = field(default_factory=dict)
    found: dict[str, ShardInfo] = field(default_factory=dict)  # by URL: each readable shard as it is
    unresolved: list[str] = field(default_factory=list)  # sources that named nothing readable
    schemas: dict[str, DatasetSchema] = field(default_factory=dict)  # by split label: the schema its headers give

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "shards": self.shards, "samples": self.samples, "bytes": self.bytes,
                "splits": self.splits, "problems": [asdict(p) for p in self.problems]}


@dataclass
class _SplitState:
    schema: DatasetSchema | None
    keys: dict[str, str] = field(default_factory=dict)
    samples: int = 0


class _ShardChecker:
    """Checks the members of one shard as they stream past."""

    def __init__(self, url: str, split: _SplitState, decode: bool, problems: list[Problem]) -> None:
        self.url, self.split, self.decode, self.problems = url, split, decode, problems
        self.key: str | None = None
        self.members: dict[str, bytes] = {}
        self.columns: bytes | None = None
        self.records: list[dict[str, Any] | None] = []
        self.samples = 0
        self.count = 0

    def problem(self, member: str | None, reason: str) -> None:
        self.problems.append(Problem(self.url, member, reason))

    def member(self, member: Member, shard: bytes) -> None:
        first, self.count = self.count == 0, self.count + 1
        name, data = member.name, bytes(shard[member.start:member.start + member.size])
        if not member.regular:
            return self.problem(name, f"expected a regular file member, found tar type {chr(member.typeflag)!r}")
        if name == HEADER_MEMBER:
            return self._header(data, first)
        if first:
            self.problem(name, f"expected first member {HEADER_MEMBER!r}, found {quoted(name)}")
        if name == LABELS_MEMBER:
            self.finish_sample()
            self.columns = data
            return None
        if self.columns is not None:
            self.problem(name, f"sample member after {LABELS_MEMBER!r}, which must come last")
        try:
            key, ext = member_key(name, f"tar header at byte {member.header_at}")
        except ShardFormatError as e:
            return self.problem(quoted(name), str(e))
        if key != self.key:
            self.finish_sample()
            self.key = key
        if ext in self.members:
            self.problem(name, "member repeated within its sample")
        self.members[ext] = data

    def _header(self, data: bytes, first: bool) -> None:
        if not first:
            return self.problem(HEADER_MEMBER, "expected the header as the first member only")
        try:
            schema = parse_header_json(data, self.url)
        except ShardFormatError as e:
            return self.problem(HEADER_MEMBER, str(e))
        ref = self.split.schema
        if ref is None:
            self.split.schema = schema
        elif schema != ref:
            self.problem(HEADER_MEMBER, "header differs from the split's: " + _diff(ref, schema))

    def finish_sample(self) -> None:
        if self.key is None:
            return
        key, members, self.key, self.members = self.key, self.members, None, {}
        self.samples += 1
        if key in self.split.keys:
            self.problem(key, f"duplicate sample key (also in {self.split.keys[key]})")
        self.split.keys.setdefault(key, self.url)
        schema = self.split.schema
        if schema is None:
            return
        image_ext = schema.image.encoding
        for ext in sorted(set(members) - {image_ext, LABELS_EXT}):
            self.problem(f"{key}.{ext}", f"unexpected member (expected {image_ext} and {LABELS_EXT})")
        for ext in (image_ext, LABELS_EXT):
            if ext not in members:
                self.problem(key, f"incomplete sample: missing its {ext} member")
        if LABELS_EXT in members:
            self._labels(schema, f"{key}.{LABELS_EXT}", members[LABELS_EXT])
        if image_ext in members:
            self._image(schema, f"{key}.{image_ext}", members[image_ext])

    def _labels(self, schema: DatasetSchema, name: str, data: bytes) -> None:
        try:
            record = decode_labels(data, name)
        except ShardFormatError as e:
            self.records.append(None)
            return self.problem(name, str(e))
        problems = label_problems(schema, record)
        for reason in problems:
            self.problem(name, reason)
        self.records.append(None if problems else record)

    def check_columns(self) -> None:
        """The ``__labels__`` member, if any, must repeat every sample's label member."""
        schema = self.split.schema
        if self.columns is None or schema is None:
            return
        try:
            classes, values = decode_label_columns(self.columns, schema, len(self.records), self.url)
        except ShardFormatError as e:
            return self.problem(LABELS_MEMBER, str(e).removeprefix(f"{self.url}: {LABELS_MEMBER}: "))
        differing = [i for i, record in enumerate(self.records) if record is not None and any(
            classes[h][i] != record[h]["class"] or (h in values and values[h][i] != np.float32(record[h]["value"]))
            for h in schema.head_names)]
        if differing:
            self.problem(LABELS_MEMBER, f"disagrees with {len(differing)} sample label member(s), first: "
                                        f"sample {differing[0]} of the shard")

    def _image(self, schema: DatasetSchema, name: str, data: bytes) -> None:
        spec = schema.image
        if spec.encoding == "raw":
            if len(data) != spec.nbytes:
                self.problem(name, f"raw image expected {spec.nbytes} bytes "
                                   f"({spec.describe()}), found {len(data)}")
            return
        if self.decode:
            self._decode(spec.height, spec.width, spec.channels, name, data)

    def _decode(self, height: int | None, width: int | None, channels: int, name: str, data: bytes) -> None:
        """The image must decode; to the declared HxWxC, or with the declared channels when sizes vary."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                shape = np.asarray(img).shape
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return self.problem(name, f"image does not decode ({e})")
        found = (shape[0], shape[1], shape[2] if len(shape) == 3 else 1)
        expected = (height or found[0], width or found[1], channels)
        if found != expected:
            sizes = f"{height}x{width}" if height is not None else "(any)x(any)"
            self.problem(name, f"image expected HxWxC {sizes}x{channels}, found {'x'.join(map(str, found))}")


def _diff(a: DatasetSchema, b: DatasetSchema) -> str:
    da, db = a.to_dict(), b.to_dict()
    return "; ".join(f"{k}: expected {da.get(k)!r}, found {db.get(k)!r}"
                     for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k))


def _check_shard(url: str, split: _SplitState, decode: bool, problems: list[Problem],
                 storage_options: dict[str, Any]) -> tuple[int, int, str] | None:
    """Read one shard, walk it as the loader does, check every member; returns (samples,
    bytes, sha256), or None if it cannot be read."""
    try:
        data = read_shard(url, storage_options=storage_options)
    except ShardFormatError as e:
        problems.append(Problem(url, None, str(e).removeprefix(f"{url}: ")))
        return None
    checker = _ShardChecker(url, split, decode, problems)
    last, end = None, 0
    try:
        for member in iter_members(data, url):
            checker.member(member, data)
            last, end = member.name, member.start + -(-member.size // BLOCK) * BLOCK
    except ShardFormatError as e:
        where = f"after member {quoted(last)}" if last else "at the start"
        checker.problem(last, f"tar structure broken {where} ({str(e).removeprefix(url + ': ')}); the shard is "
                              "truncated or corrupt")
    else:
        _check_end(checker, data, end)
    checker.finish_sample()
    checker.check_columns()
    if checker.count == 0:
        checker.problem(None, f"expected a tar with a {HEADER_MEMBER!r} member, found no members")
    split.samples += checker.samples
    return checker.samples, len(data), hashlib.sha256(data).hexdigest()


def _check_end(checker: _ShardChecker, data: bytes, end: int) -> None:
    """After the last member: the end-of-archive marker (two zero blocks), and only zeros."""
    tail = data[end:]
    if len(tail) < 2 * BLOCK or bytes(tail[:2 * BLOCK]).strip(b"\0"):
        checker.problem(None, f"missing end-of-archive marker: the tar is truncated ({len(data)} bytes)")
    elif bytes(tail).strip(b"\0"):
        checker.problem(None, "non-zero bytes after the end-of-archive marker")


def _compare(info: ShardInfo, url: str, found: tuple[int, int, str], problems: list[Problem]) -> None:
    for what, expected, actual in zip(("samples", "bytes", "sha256"),
                                      (info.samples, info.bytes, info.sha256), found, strict=True):
        if expected != actual:
            problems.append(Problem(url, None, f"manifest says {what} {expected}, found {actual}"))


def _unlisted(shards: ShardSet, storage_options: dict[str, Any]) -> list[Problem]:
    if shards.listed_dir is None or shards.manifest is None:
        return []
    fs, path = filesystem(shards.listed_dir, storage_options)
    listed = {s.name for s in shards.manifest.shards}
    return [Problem(p, None, f"shard not listed in {shards.manifest_url}")
            for p in sorted(fs.glob(path.rstrip("/") + "/*.tar")) if p.rsplit("/", 1)[-1] not in listed]


def validate(source: str | Sequence[str], *, decode: bool = False, progress: bool | None = None,
             storage_options: dict[str, Any] | None = None) -> ValidationReport:
    """Validate every shard named by ``source`` and return all problems found."""
    options = storage_options or {}
    report = ValidationReport()
    named = _resolve_each(source, options, report)
    labels = _split_labels(named, options)
    total = sum(len(s.urls) for _, s in named)
    with tqdm(total=total, desc="validate", unit="shard", disable=None if progress is None else not progress) as bar:
        for (_, shards), label in zip(named, labels, strict=True):
            _validate_set(shards, label, decode, options, report, bar)
    return report


def _resolve_each(source: str | Sequence[str], options: dict[str, Any],
                  report: ValidationReport) -> list[tuple[str, ShardSet]]:
    """The shard sets ``source`` names, each with the source it came from (one name as given,
    brace patterns expanded, or ``"shards"`` for a list of shard URLs, which is one set); a
    name that cannot be resolved is a problem of its own (the others are still validated)."""
    items = [source] if isinstance(source, str) else list(source)
    urls = [u for item in items for u in braceexpand.braceexpand(item)]
    if len(urls) > 1 and not all(u.endswith(".tar") for u in urls):
        return [pair for u in urls for pair in _resolve_each(u, options, report)]
    try:
        sets = resolve_shards(source, storage_options=options)
    except PipelineError as e:
        if len(items) == 1:
            name = items[0]
            report.problems.append(Problem(name, None, str(e).removeprefix(f"{name}: ")))
            report.unresolved.append(name)
            return []
        return [pair for item in items for pair in _resolve_each(item, options, report)]
    name = items[0] if len(items) == 1 else "shards"
    return [(name, s) for s in sets]


def _split_labels(named: list[tuple[str, ShardSet]], options: dict[str, Any]) -> list[str]:
    """Each set's label in the report: its split's name (a split directory without a manifest
    by its directory's name); when several sources are validated, or split names repeat, the
    split's directory as its source names it (``data/shards/vimh/train``), so that no split is
    counted under another's label."""
    short = [shards.split or shards.label for _, shards in named]
    if len({name for name, _ in named}) <= 1 and len(set(short)) == len(short):
        return short
    return [_where(name, shards, options) for name, shards in named]


def _where(name: str, shards: ShardSet, options: dict[str, Any]) -> str:
    """The directory of ``shards`` as ``name`` (the source it came from) names it: the source
    itself (a split directory or its manifest), or a split directory under it (a root)."""
    if shards.listed_dir is None:
        return name  # shards named one by one
    base = name.rstrip("/")
    if base.endswith(".json"):
        base = posixpath.dirname(base)
    inside = filesystem(base, options)[1].rstrip("/") != filesystem(shards.listed_dir, options)[1].rstrip("/")
    return f"{base}/{posixpath.basename(shards.listed_dir.rstrip('/'))}" if inside else base


def _validate_set(shards: ShardSet, label: str, decode: bool, options: dict[str, Any],
                  report: ValidationReport, bar: tqdm) -> None:
    state = _SplitState(schema=shards.manifest.schema if shards.manifest else None)
    infos = shards.manifest.shards if shards.manifest else (None,) * len(shards.urls)
    if shards.incomplete is not None:
        report.problems.append(Problem(shards.label, None, shards.incomplete.removeprefix(f"{shards.label}: ")))
    report.problems.extend(_unlisted(shards, options))
    for url, info in zip(shards.urls, infos, strict=True):
        found = _check_shard(url, state, decode, report.problems, options)
        bar.update()
        if found is None:
            continue
        report.shards += 1
        report.bytes += found[1]
        report.found[url] = ShardInfo(url.rsplit("/", 1)[-1], *found)
        if info is not None:
            _compare(info, url, found, report.problems)
    report.samples += state.samples
    report.splits[label] = report.splits.get(label, 0) + state.samples  # one split named twice: counted twice
    if state.schema is not None:
        report.schemas.setdefault(label, state.schema)
