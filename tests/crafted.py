"""Crafting hostile shards for tests: tar headers with any field set by hand, shards rebuilt
member by member, and manifests edited or made to match crafted shards."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

BLOCK = 512
Members = list[tuple[str, bytes]]


def header_block(name: str | bytes, size: int, *, typeflag: bytes = b"0", size_field: bytes | None = None,
                 checksum: bytes | None = None, magic: bytes | None = None, prefix: bytes = b"") -> bytes:
    """A ustar header as tarfile writes it, then with any field replaced; the checksum is
    recomputed afterwards unless ``checksum`` is given."""
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode = size, 0, 0o644
    buf = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    raw = name.encode() if isinstance(name, str) else name
    buf[0:100] = raw[:100].ljust(100, b"\0")
    buf[156:157] = typeflag
    if size_field is not None:
        buf[124:136] = size_field.ljust(12, b"\0")[:12]
    if magic is not None:
        buf[257:263] = magic
    if prefix:
        buf[345:500] = prefix.ljust(155, b"\0")
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    if checksum is not None:
        buf[148:156] = checksum
    return bytes(buf)


def member(name: str | bytes, data: bytes, **fields: bytes) -> bytes:
    """Header, data and padding of one member."""
    return header_block(name, len(data), **fields) + data + bytes(-len(data) % BLOCK)


def end_of_archive() -> bytes:
    return bytes(2 * BLOCK)


def members_of(shard: Path) -> Members:
    """A sound shard's members as (name, data), read by tarfile."""
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def rebuild(shard: Path, edit: Callable[[Members], list[bytes | tuple[str, bytes]]], *, end: bool = True) -> None:
    """Write ``shard`` again from ``edit(members)``: (name, data) pairs become plain members,
    bytes are written as they are (crafted members); ``end``: then the end-of-archive marker."""
    parts = [p if isinstance(p, bytes) else member(*p) for p in edit(members_of(shard))]
    shard.write_bytes(b"".join(parts) + (end_of_archive() if end else b""))


def relist(split_dir: Path, samples: dict[str, int] | None = None) -> None:
    """Make the manifest match its shards' bytes and sha256 as they are now (a crafted shard
    set whose manifest agrees), with sample counts from ``samples`` where given."""
    path = split_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["shards"]:
        shard = split_dir / entry["name"]
        if shard.is_file():
            data = shard.read_bytes()
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        entry["samples"] = (samples or {}).get(entry["name"], entry["samples"])
    manifest["num_samples"] = sum(e["samples"] for e in manifest["shards"])
    path.write_text(json.dumps(manifest))


def edit_manifest(split_dir: Path, edit: Callable[[dict], object]) -> None:
    path = split_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
