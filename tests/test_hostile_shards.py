"""One table of hostile inputs: each case, then what `shards validate`, the loader in
``raise`` mode and the loader in ``skip`` mode make of it. Nothing may hang, crash with a
raw exception, or lose, duplicate or mislabel samples silently."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

from pipeline import make_loader
from pipeline.errors import HeaderMismatchError, ManifestError, PipelineError, ShardFormatError
from pipeline.format.shard_index import index_shard
from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh
from shard_tools.validate import validate
from tests.crafted import BLOCK, edit_manifest, header_block, member, rebuild, relist

SAMPLES = 48  # 3 train shards of 16
Check = tuple[type[BaseException], str] | tuple[int, str | None]  # an error and its message, or a count and a log line


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    src = generate_vimh(root / "vimh-8x8x1_h", n_train=SAMPLES, n_test=4, height=8, width=8, channels=1)
    convert("vimh", src, root / "out", max_samples=16)
    return root / "out"


def shard(root: Path, i: int = 1) -> Path:
    return root / "train" / f"train-{i:06d}.tar"


def crafted(edit: Callable[[list[tuple[str, bytes]]], list], i: int = 1, samples: int | None = None):
    """A mutation: rebuild shard ``i`` through ``edit`` and make the manifest agree with it."""
    def mutate(root: Path) -> None:
        rebuild(shard(root, i), edit)
        relist(root / "train", {shard(root, i).name: samples} if samples is not None else None)
    return mutate


def no_columns(members: list) -> list:
    """Without ``__labels__``: the loader then decodes every label member."""
    return [m for m in members if m[0] != "__labels__"]


def with_label(index: int, change: Callable[[dict], object]):
    """Sample ``index``'s label record changed (and no ``__labels__``)."""
    def edit(members: list) -> list:
        members = no_columns(members)
        name, data = members[2 + 2 * index]
        record = msgpack.unpackb(data)
        change(record)
        members[2 + 2 * index] = (name, msgpack.packb(record))
        return members
    return edit


def set_class(value: object) -> Callable[[dict], object]:
    return lambda record: record["note_number"].__setitem__("class", value)


def header_field(index: int, **fields: bytes):
    """Member ``index`` (0: __header__) with raw header fields replaced."""
    def edit(members: list) -> list:
        name, data = members[index]
        return [*members[:index], member(name, data, **fields), *members[index + 1:]]
    return edit


def replaced_member(index: int, raw: bytes):
    def edit(members: list) -> list:
        return [*members[:index], raw, *members[index + 1:]]
    return edit


def named(index: int, name: str | bytes):
    def edit(members: list) -> list:
        return [*members[:index], (name, members[index][1]) if isinstance(name, str) else
                member(name, members[index][1]), *members[index + 1:]]
    return edit


def pax_record(key: str, value: str) -> str:
    """One pax record, ``"<length> <key>=<value>\n"``, its length counting its own digits."""
    body = f" {key}={value}\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return f"{length}{body}"


def pax_named(index: int, path: str):
    """Member ``index`` preceded by a pax header whose ``path`` record names it ``path``."""
    def edit(members: list) -> list:
        name, data = members[index]
        return [*members[:index], member("PaxHeader", pax_record("path", path).encode(), typeflag=b"x"),
                (name, data), *members[index + 1:]]
    return edit


def gnu_long_named(index: int, path: str):
    def edit(members: list) -> list:
        name, data = members[index]
        return [*members[:index], member("././@LongLink", path.encode() + b"\0", typeflag=b"L"), (name, data),
                *members[index + 1:]]
    return edit


def truncate(i: int, keep: int):
    def mutate(root: Path) -> None:
        data = shard(root, i).read_bytes()
        shard(root, i).write_bytes(data[:keep])
    return mutate


def manifest(edit: Callable[[dict], object]):
    return lambda root: edit_manifest(root / "train", edit)


def first_shard(key: str, value: object) -> Callable[[dict], object]:
    return lambda m: m["shards"][0].__setitem__(key, value)


def relisted_count(count: int):
    """Shard 1's listed count set to ``count`` (bytes and sha256 as they are)."""
    return lambda root: relist(root / "train", {shard(root).name: count})


def special_file(kind: str):
    def mutate(root: Path) -> None:
        path = shard(root)
        path.unlink()
        if kind == "directory":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to("/dev/zero")
    return mutate


def unpublished(staging: bool):
    """A split whose manifest is gone (a killed publish), with or without the staging left."""
    def mutate(root: Path) -> None:
        (root / "train" / "manifest.json").unlink()
        if staging:
            (root / "train" / ".staging").mkdir()
    return mutate


def deep_json(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[Path], None]
    validate: str | None  # a problem line must match this (None: no problem)
    raise_mode: Check
    skip_mode: Check


HEADER_FIELD_ERROR = r"train-000001.tar: tar header at byte \d+: size: expected"
UNLISTED = r"no manifest.json: the split is incomplete"
UNFINISHED = r"a conversion into it has not finished"
CASES = [
    Case("negative size (octal)", crafted(header_field(3, size_field=b"-0000001000")),
         r"size: expected octal digits, found b'-0000001000", (ShardFormatError, HEADER_FIELD_ERROR + " octal"),
         (SAMPLES, r"size: expected octal digits")),
    Case("negative size (base-256)", crafted(header_field(3, size_field=b"\xff" * 12)),
         r"expected a non-negative number", (ShardFormatError, HEADER_FIELD_ERROR + " a non-negative number"),
         (SAMPLES, r"non-negative number")),
    Case("size with a sign and an underscore", crafted(header_field(3, size_field=b"+0_00000100")),
         r"expected octal digits", (ShardFormatError, HEADER_FIELD_ERROR), (SAMPLES, r"expected octal digits")),
    Case("size past the end", crafted(header_field(3, size_field=b"77777777777")),
         r"truncated: expected 8589934591 bytes", (ShardFormatError, r"truncated: expected 8589934591 bytes"),
         (SAMPLES, r"truncated")),
    Case("bad header checksum", crafted(header_field(3, checksum=b"000001\0 ")), r"bad header checksum",
         (ShardFormatError, r"train-000001.tar: tar header at byte \d+: bad header checksum"),
         (SAMPLES, r"bad header checksum")),
    Case("not a ustar header", crafted(header_field(3, magic=b"xxxxx\0")), r"expected a ustar header",
         (ShardFormatError, r"byte \d+: expected a ustar header"), (SAMPLES, r"expected a ustar header")),
    Case("truncated shard", truncate(1, 7000), r"truncated|differ|manifest says bytes",
         (ManifestError, r"differ in size from the manifest"), (SAMPLES - 16 + 7000 // 1024, r"truncated")),
    Case("no end-of-archive marker", lambda root: _cut_end(root),
         r"missing end-of-archive marker|truncated", (ShardFormatError, r"missing end-of-archive marker"),
         (SAMPLES, r"missing end-of-archive marker")),
    Case("symlink member", crafted(header_field(3, typeflag=b"2")), r"expected a regular file member, found tar type",
         (ShardFormatError, r"expected a regular file, found tar type '2'"), (SAMPLES, r"regular file")),
    Case("device member", crafted(header_field(3, typeflag=b"3")), r"found tar type '3'",
         (ShardFormatError, r"found tar type '3'"), (SAMPLES, r"found tar type '3'")),
    Case("directory member", crafted(header_field(3, typeflag=b"5")), r"found tar type '5'",
         (ShardFormatError, r"found tar type '5'"), (SAMPLES, r"found tar type '5'")),
    Case("name ../../x", crafted(named(3, "../../x.raw")), r"expected a name <key>.<extension>",
         (ShardFormatError, r"member '../../x.raw': expected a name <key>.<extension>"), (SAMPLES, r"<key>")),
    Case("absolute name", crafted(named(3, "/abs/path.raw")), r"expected a name <key>.<extension>",
         (ShardFormatError, r"member '/abs/path.raw': expected a name"), (SAMPLES, r"<key>")),
    Case("name with a NUL", crafted(named(3, b"000\x00001.raw")), r"expected a name|incomplete sample",
         (ShardFormatError, r"expected a name <key>.<extension>|missing"), (SAMPLES, r".")),
    Case("pax path ../evil", crafted(pax_named(3, "../evil.raw")), r"member '../evil.raw': expected a name",
         (ShardFormatError, r"member '../evil.raw': expected a name"), (SAMPLES, r"<key>")),
    Case("GNU long name ../evil", crafted(gnu_long_named(3, "../evil.raw")), r"member '../evil.raw': expected a name",
         (ShardFormatError, r"member '../evil.raw': expected a name"), (SAMPLES, r"<key>")),
    Case("GNU long name that is a sound key", crafted(lambda m: gnu_long_named(3, m[3][0])(m)), None,
         (SAMPLES, None), (SAMPLES, None)),
    Case("a key twice in a shard", crafted(lambda m: [*m[:5], m[1], m[2], *m[5:]]), r"duplicate sample key",
         (ShardFormatError, r"key '\d+' again"), (SAMPLES, r"again")),
    Case("a member twice in a sample", crafted(lambda m: [*m[:2], m[1], *m[2:]]), r"member repeated within its sample",
         (ShardFormatError, r"repeated within its sample"), (SAMPLES, r"repeated")),
    Case("no __header__ first", crafted(lambda m: m[1:]), r"expected first member '__header__'",
         (ShardFormatError, r"expected first member '__header__'"), (ShardFormatError, r"__header__")),
    Case("header of another split", crafted(lambda m: [("__header__", m[0][1].replace(b'"train"', b'"trayn"')),
                                                       *m[1:]]),
         r"header differs", (HeaderMismatchError, r"disagree with the split's schema"),
         (HeaderMismatchError, r"disagree")),
    Case("deeply nested header JSON", crafted(lambda m: [("__header__", deep_json(100_000)), *m[1:]]),
         r"nested at most 32 deep", (ShardFormatError, r"nested at most 32 deep"), (ShardFormatError, r"nested")),
    Case("64 MB header", crafted(lambda m: [("__header__", b'"' + b"x" * (64 << 20) + b'"'), *m[1:]]),
         r"expected at most 8388608 bytes", (ShardFormatError, r"__header__: expected at most 8388608 bytes"),
         (ShardFormatError, r"at most")),
    Case("class 99 of 13", crafted(with_label(0, set_class(99))), r"class expected in 0..12, found 99",
         (ShardFormatError, r"class expected an int in 0..12, found 99"), (SAMPLES, r"found 99")),
    Case("class -1", crafted(with_label(0, set_class(-1))), r"found -1",
         (ShardFormatError, r"class expected an int in 0..12, found -1"), (SAMPLES, r"found -1")),
    Case("class a string", crafted(with_label(0, set_class("3"))), r"found '3'",
         (ShardFormatError, r"found '3'"), (SAMPLES, r"found '3'")),
    Case("class 2**64-1", crafted(with_label(0, set_class(2**64 - 1))), r"found 18446744073709551615",
         (ShardFormatError, r"found 18446744073709551615"), (SAMPLES, r"18446744073709551615")),
    Case("class a float", crafted(with_label(0, set_class(3.0))), r"found 3.0",
         (ShardFormatError, r"found 3.0"), (SAMPLES, r"found 3.0")),
    Case("class a boolean", crafted(with_label(0, set_class(True))), r"found True",
         (ShardFormatError, r"found True"), (SAMPLES, r"found True")),
    Case("value NaN", crafted(with_label(0, lambda r: r["note_number"].__setitem__("value", float("nan")))),
         r"value expected", (ShardFormatError, r"value expected a number in .*, found nan"), (SAMPLES, r"nan")),
    Case("a head missing", crafted(with_label(0, lambda r: r.pop("note_number"))), r"expected a map with 'class'",
         (ShardFormatError, r"labels do not decode to every head's class"), (SAMPLES, r"do not decode")),
    Case("column class out of range", crafted(lambda m: [*m[:-1], ("__labels__", _columns_with_class(m[-1][1], 77))]),
         r"__labels__: disagrees", (ShardFormatError, r"__labels__: head 'note_number': class expected an int in "
                                                      r"0..12, found 77"), (SAMPLES, r"found 77")),
    Case("manifest: a huge count", manifest(first_shard("samples", 10**12)), r"samples cannot fit in \d+ bytes",
         (ManifestError, r"10{12} samples cannot fit in \d+ bytes"), (ManifestError, r"cannot fit")),
    Case("manifest: a count too low", relisted_count(15), r"manifest says samples 15, found 16",
         (ManifestError, r"the manifest lists 15 samples, the shard holds 16"),
         (SAMPLES - 1, r"samples after the listed ones are not read")),
    Case("manifest: a count too high", relisted_count(17), r"manifest says samples 17, found 16",
         (ManifestError, r"the manifest lists 17 samples, the shard holds 16"),
         (SAMPLES + 1, r"the missing ones are replaced")),
    Case("manifest: a shard twice", manifest(lambda m: (m["shards"].append(m["shards"][0]),
                                                        m.__setitem__("num_samples", SAMPLES + 16))),
         r"listed again", (ManifestError, r"'train-000000.tar' is listed again"), (ManifestError, r"listed again")),
    Case("manifest: count true", manifest(first_shard("samples", True)), r"expected integers >= 0, found True",
         (ManifestError, r"samples and bytes: expected integers >= 0, found True"), (ManifestError, r"True")),
    Case("manifest: empty name", manifest(first_shard("name", "")), r"expected a plain file name",
         (ManifestError, r"name: expected a plain file name"), (ManifestError, r"plain file name")),
    Case("manifest: a directory name", manifest(first_shard("name", "sub/")), r"expected a plain file name",
         (ManifestError, r"found 'sub/'"), (ManifestError, r"plain file name")),
    Case("manifest: a NUL in a name", manifest(first_shard("name", "a\0b.tar")), r"expected a plain file name",
         (ManifestError, r"plain file name"), (ManifestError, r"plain file name")),
    Case("manifest: a path out", manifest(first_shard("name", "../x.tar")), r"expected a plain file name",
         (ManifestError, r"found '../x.tar'"), (ManifestError, r"plain file name")),
    Case("manifest: deeply nested", lambda root: (root / "train" / "manifest.json").write_bytes(deep_json(100_000)),
         r"nested at most 32 deep", (ManifestError, r"nested at most 32 deep"), (ManifestError, r"nested")),
    Case("manifest: num_samples wrong", manifest(lambda m: m.__setitem__("num_samples", 7)),
         r"num_samples expected 48", (ManifestError, r"num_samples expected 48"), (ManifestError, r"num_samples")),
    Case("a listed shard missing", lambda root: shard(root).unlink(), r"shard not found",
         (ShardFormatError, r"train-000001.tar: shard not found"), (ShardFormatError, r"not found")),
    Case("a shard that is a directory", special_file("directory"), r"expected a regular file, found a directory",
         (ShardFormatError, r"found a directory"), (ShardFormatError, r"directory")),
    Case("a shard that is a named pipe", special_file("fifo"), r"found a named pipe",
         (ShardFormatError, r"expected a regular file, found a named pipe"), (ShardFormatError, r"named pipe")),
    Case("a shard linked to a device", special_file("device"), r"found a character device",
         (ShardFormatError, r"found a character device"), (ShardFormatError, r"character device")),
    Case("half published: no manifest", unpublished(staging=False), UNLISTED, (ManifestError, UNLISTED),
         (ManifestError, UNLISTED)),
    Case("killed conversion: staging, no manifest", unpublished(staging=True), UNFINISHED,
         (ManifestError, UNFINISHED), (ManifestError, UNFINISHED)),
    Case("an unlisted shard", lambda root: shutil.copy(shard(root, 0), root / "train" / "train-000009.tar"),
         r"train-000009.tar: shard not listed", (SAMPLES, None), (SAMPLES, None)),
    Case("flipped pixel bytes", lambda root: _flip_pixel(shard(root, 0)), r"manifest says sha256",
         (SAMPLES, None), (SAMPLES, None)),
    Case("bytes after the end marker", lambda root: (_append(shard(root, 0), b"\x01" * BLOCK), relist(root / "train")),
         r"non-zero bytes after the end-of-archive marker", (SAMPLES, None), (SAMPLES, None)),
]


def _columns_with_class(payload: bytes, value: int) -> bytes:
    columns = msgpack.unpackb(payload)
    classes = bytearray(columns["classes"]["note_number"])
    classes[0:4] = value.to_bytes(4, "little", signed=True)
    columns["classes"]["note_number"] = bytes(classes)
    return msgpack.packb(columns)


def _cut_end(root: Path) -> None:
    """Shard 1 without its end-of-archive marker, its manifest entry made to agree."""
    rebuild(shard(root), lambda m: m, end=False)
    relist(root / "train")


def _flip_pixel(path: Path) -> None:
    """A byte inside the first image flipped: nothing but the sha256 can tell."""
    data = bytearray(path.read_bytes())
    data[int(index_shard(bytes(data), str(path)).offsets["raw"][0]) + 10] ^= 0xFF
    path.write_bytes(bytes(data))


def _append(path: Path, extra: bytes) -> None:
    path.write_bytes(path.read_bytes() + extra)


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request, pristine: Path, tmp_path: Path) -> tuple[Case, Path]:
    root = Path(shutil.copytree(pristine, tmp_path / "out"))
    request.param.mutate(root)
    return request.param, root


def read_all(root: Path, on_error: str, num_workers: int = 0) -> int:
    loader = make_loader(str(root), batch_size=8, num_workers=num_workers, on_error=on_error, with_keys=True,
                         shuffle=False)
    return sum(len(keys) for _, _, keys in loader)


def expect(check: Check, run: Callable[[], int], caplog) -> None:
    outcome, detail = check
    if isinstance(outcome, type):
        with pytest.raises(outcome, match=detail):
            run()
        return
    with caplog.at_level(logging.WARNING):
        assert run() == outcome
    if detail is not None:
        assert any(re.search(detail, r.getMessage()) for r in caplog.records), caplog.text


@pytest.mark.timeout(60)
def test_validate_reports_it(case) -> None:
    spec, root = case
    report = validate(str(root), progress=False)
    lines = [str(p) for p in report.problems]
    if spec.validate is None:
        assert report.ok, lines
        return
    assert any(re.search(spec.validate, line) for line in lines), lines
    assert all(len(line) < 2000 for line in lines), "a problem line quotes too much"


@pytest.mark.timeout(60)
def test_raise_mode(case, caplog) -> None:
    spec, root = case
    expect(spec.raise_mode, lambda: read_all(root, "raise"), caplog)


@pytest.mark.timeout(60)
def test_skip_mode(case, caplog) -> None:
    spec, root = case
    expect(spec.skip_mode, lambda: read_all(root, "skip"), caplog)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_negative_size_with_workers_ends_without_hanging(pristine: Path, tmp_path: Path, mode: str) -> None:
    """The crafted size that once made the loader spin forever, read by two worker processes."""
    root = Path(shutil.copytree(pristine, tmp_path / "out"))
    crafted(header_field(3, size_field=b"-0000001000"))(root)
    if mode == "raise":
        with pytest.raises(ShardFormatError, match=HEADER_FIELD_ERROR):
            read_all(root, mode, num_workers=2)
    else:
        assert read_all(root, mode, num_workers=2) == SAMPLES


def test_every_error_is_a_project_error() -> None:
    """The table's expected errors are all in the project's tree (never a raw exception)."""
    for spec in CASES:
        for outcome, _ in (spec.raise_mode, spec.skip_mode):
            assert not isinstance(outcome, type) or issubclass(outcome, PipelineError), spec.id


def test_header_block_helper_matches_tarfile() -> None:
    """The crafting helper itself writes what tarfile writes for a plain member."""
    import tarfile

    info = tarfile.TarInfo("00000001.raw")
    info.size, info.mtime, info.mode = 3, 0, 0o644
    assert header_block("00000001.raw", 3) == info.tobuf(format=tarfile.USTAR_FORMAT)
