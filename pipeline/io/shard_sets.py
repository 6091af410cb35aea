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

from pipeline.errors import ManifestError, ShardFormatError
from pipeline.format.manifest import MANIFEST_NAME, Manifest
from pipeline.io.reading import read_manifest
from pipeline.io.storage import filesystem, remote_errors

STAGING_DIR = ".staging"  # where a conversion stages a split before publishing it


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split: their URLs and, when there is one, the manifest.
    ``incomplete`` says why a split directory has no manifest (its shards were then listed
    from the directory, and are read only when the caller allows it)."""

    label: str
    urls: tuple[str, ...]
    manifest: Manifest | None = None
    manifest_url: str | None = None
    listed_dir: str | None = None
    incomplete: str | None = None

    @property
    def split(self) -> str | None:
        if self.manifest is not None:
            return self.manifest.schema.split
        return posixpath.basename(self.listed_dir.rstrip("/")) if self.listed_dir else None

    def require_manifest(self) -> ShardSet:
        """This set, if it has a manifest or its shards were named one by one; else a
        ManifestError saying why the directory has none."""
        if self.incomplete is not None:
            raise ManifestError(self.incomplete)
        return self


def _join(base: str, name: str) -> str:
    return posixpath.join(base.rstrip("/"), name)


def _split_order(path: str) -> tuple[int, str]:
    """train, val, test first, then any other split alphabetically."""
    name = posixpath.basename(path.rstrip("/"))
    order = ("train", "val", "validation", "test")
    return (order.index(name) if name in order else len(order), name)


def _from_manifest(url: str, storage_options: dict[str, Any]) -> ShardSet:
    manifest = read_manifest(url, storage_options)  # shard names checked: plain file names, each once
    base = posixpath.dirname(url)
    urls = tuple(_join(base, s.name) for s in manifest.shards)
    return ShardSet(label=manifest.schema.split, urls=urls, manifest=manifest,
                    manifest_url=url, listed_dir=base)


def _unlisted(url: str, fs: fsspec.AbstractFileSystem, path: str, full: Any) -> ShardSet | None:
    """The ``.tar`` files of a directory without a manifest, with the reason it has none;
    None when it holds neither shards nor a conversion's staging."""
    entries = fs.ls(path, detail=False)
    tars = sorted(p for p in entries if p.endswith(".tar"))
    staging = any(posixpath.basename(p.rstrip("/")) == STAGING_DIR for p in entries)
    if not tars and not staging:
        return None
    if staging:
        why = (f"{url}: no {MANIFEST_NAME}, and a conversion's {STAGING_DIR} directory is there: a conversion into "
               "it has not finished (or was killed); run the same conversion again to finish it")
    else:
        why = (f"{url}: no {MANIFEST_NAME}: the split is incomplete, or its manifest was not copied with its shards; "
               f"`shards manifest {url}` checks the shards and writes one")
    why += " (to read the shards anyway, name them one by one or pass require_manifest=False)"
    return ShardSet(label=url, urls=tuple(full(t) for t in tars), listed_dir=url, incomplete=why)


def _from_dir(url: str, fs: fsspec.AbstractFileSystem, path: str,
              storage_options: dict[str, Any], split: str | None) -> list[ShardSet]:
    def full(p: str) -> str:
        return p if "://" not in url else fs.unstrip_protocol(p)

    if fs.exists(_join(path, MANIFEST_NAME)):
        found = [_from_manifest(full(_join(path, MANIFEST_NAME)), storage_options)]
    else:
        subdirs = sorted((p for p in fs.ls(path, detail=False) if fs.isdir(p)
                          and posixpath.basename(p.rstrip("/")) != STAGING_DIR), key=_split_order)
        listed = [_from_manifest(full(_join(d, MANIFEST_NAME)), storage_options) if fs.exists(_join(d, MANIFEST_NAME))
                  else _unlisted(_join(url, posixpath.basename(d.rstrip("/"))), fs, d, full) for d in subdirs]
        found = [s for s in listed if s is not None]
        root = None if found else _unlisted(url, fs, path, full)  # no split subdirectories: the shards here
        found += [root] if root is not None else []
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
            twice = sorted({u for u in urls if urls.count(u) > 1}) if len(set(urls)) < len(urls) else []
            if twice:
                raise ShardFormatError(f"shard(s) named more than once: {twice[:5]}; each shard is read once per "
                                       "epoch, so name each once")
            return [ShardSet(label="shards", urls=tuple(urls))] if urls else []
        return [s for u in urls for s in resolve_shards(u, split=split, storage_options=options)]
    expanded = list(braceexpand.braceexpand(source))
    if len(expanded) > 1:
        return resolve_shards(expanded, split=split, storage_options=options)
    if source.endswith(".json"):
        return [_from_manifest(source, options)]
    if source.endswith(".tar"):
        return [ShardSet(label=source, urls=(source,))]
    with remote_errors(source, ShardFormatError, "shard set", options):
        fs, path = filesystem(source, options)
        if not fs.exists(path):
            raise ShardFormatError(f"{source}: no such file or directory")
        return _from_dir(source, fs, path, options, split)
