"""Resolve what a user names (directory, manifest, brace pattern, URL list) into shard sets.

Every path may be local or any fsspec URL (``file://``, ``s3://``, ``http(s)://``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import braceexpand
import fsspec
from fsspec.core import url_to_fs

from pipeline.errors import ManifestError, ShardFormatError
from pipeline.manifest import MANIFEST_NAME, Manifest, read_manifest
from pipeline.storage import REMOTE_ERRORS


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split: their URLs and, when there is one, the manifest."""

    label: str
    urls: tuple[str, ...]
    manifest: Manifest | None = None
    manifest_url: str | None = None
    listed_dir: str | None = None

    @property
    def split(self) -> str | None:
        return self.manifest.schema.split if self.manifest else None


def _join(base: str, name: str) -> str:
    return posixpath.join(base.rstrip("/"), name)


def _split_order(path: str) -> tuple[int, str]:
    """train, val, test first, then any other split alphabetically."""
    name = posixpath.basename(path.rstrip("/"))
    order = ("train", "val", "validation", "test")
    return (order.index(name) if name in order else len(order), name)


def _from_manifest(url: str, storage_options: dict[str, Any]) -> ShardSet:
    manifest = read_manifest(url, storage_options)
    base = posixpath.dirname(url)
    for shard in manifest.shards:
        if "/" in shard.name or shard.name.startswith("."):
            raise ManifestError(f"{url}: shard name {shard.name!r} must be a plain file name")
    urls = tuple(_join(base, s.name) for s in manifest.shards)
    return ShardSet(label=manifest.schema.split, urls=urls, manifest=manifest,
                    manifest_url=url, listed_dir=base)


def _from_dir(url: str, fs: fsspec.AbstractFileSystem, path: str,
              storage_options: dict[str, Any], split: str | None) -> list[ShardSet]:
    def full(p: str) -> str:
        return p if "://" not in url else fs.unstrip_protocol(p)

    if fs.exists(_join(path, MANIFEST_NAME)):
        found = [_from_manifest(full(_join(path, MANIFEST_NAME)), storage_options)]
    else:
        subdirs = sorted((p for p in fs.ls(path, detail=False) if fs.isdir(p)), key=_split_order)
        found = [_from_manifest(full(_join(d, MANIFEST_NAME)), storage_options)
                 for d in subdirs if fs.exists(_join(d, MANIFEST_NAME))]
        if not found:
            tars = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
            if tars:
                found = [ShardSet(label=url, urls=tuple(full(t) for t in tars))]
    if split is not None:
        found = [s for s in found if s.split in (split, None)]
    if not found:
        what = f"split {split!r}" if split else "shards"
        raise ShardFormatError(f"{url}: no {what} found (expected {MANIFEST_NAME}, split "
                               "subdirectories with manifests, or .tar files)")
    return found


def resolve_shards(source: str | Sequence[str], *, split: str | None = None,
                   storage_options: dict[str, Any] | None = None) -> list[ShardSet]:
    """Shard sets named by ``source``: a directory (one split with a manifest, or split
    subdirectories), a manifest file, a shard URL, a brace pattern or a list of these."""
    options = storage_options or {}
    if not isinstance(source, str):
        urls = [u for item in source for u in braceexpand.braceexpand(item)]
        if all(u.endswith(".tar") for u in urls):
            return [ShardSet(label="shards", urls=tuple(urls))] if urls else []
        return [s for u in urls for s in resolve_shards(u, split=split, storage_options=options)]
    expanded = list(braceexpand.braceexpand(source))
    if len(expanded) > 1:
        return resolve_shards(expanded, split=split, storage_options=options)
    if source.endswith(".json"):
        return [_from_manifest(source, options)]
    if source.endswith(".tar"):
        return [ShardSet(label=source, urls=(source,))]
    fs, path = url_to_fs(source, **options)
    try:
        if not fs.exists(path):
            raise ShardFormatError(f"{source}: no such file or directory")
        return _from_dir(source, fs, path, options, split)
    except PermissionError as e:
        raise ShardFormatError(f"{source}: access denied ({e}); check the credentials") from e
    except REMOTE_ERRORS as e:
        raise ShardFormatError(f"{source}: unreachable ({e})") from e
