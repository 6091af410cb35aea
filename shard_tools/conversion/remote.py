"""Uploading converted splits to object storage: ``OUT`` as ``s3://bucket/prefix`` (any fsspec URL).

:func:`~shard_tools.convert.convert` makes the shards in a local work directory exactly as
for a local ``OUT`` (so every guarantee of the local writer holds, resume included); this
module only uploads them, split by split:
shards first under ``<split>/.staging/<manifest key>/``, then copied to their names (a
server-side copy on S3), then the manifest last, then the staging objects deleted. A split
therefore has a manifest only once all its shards are in place, and a failed upload leaves
nothing but ``.staging`` objects, which no reader lists.

Resume: the work directory (a subdirectory of ``--work-dir``, default under
``$XDG_CACHE_HOME``, named after ``OUT`` and the splits) stays after a failure. A split
converted completely is marked with its conversion key and not converted again; an upload
records each shard it staged in ``progress.json`` next to it, under a prefix of its own
manifest's key, so a re-run uploads only what is missing and never mistakes another
conversion's objects for its own; a split whose manifest is already there, byte for byte,
is not uploaded again. The work directory is removed once every split is published.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from pipeline.errors import ConversionError
from pipeline.format.manifest import MANIFEST_NAME, Manifest, ShardInfo
from pipeline.io.storage import REMOTE_ERRORS, is_remote
from shard_tools.conversion.locks import LOCK
from shard_tools.staging import write_atomic

log = logging.getLogger(__name__)
UPLOAD_ERRORS: tuple[type[BaseException], ...] = (PermissionError, *REMOTE_ERRORS)
PROGRESS = "progress.json"


CONVERTED = ".converted"  # in a work split directory: the key of the complete conversion it holds


def work_directory(out: str, splits: Sequence[str], root: str | Path | None = None) -> Path:
    """Where a conversion of ``splits`` to ``out`` builds its shards: a directory of its own
    under ``root`` (default: the user's cache), so nothing else there is ever touched."""
    base = Path(root) if root is not None else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "multihead-shards" / "convert"
    name = hashlib.sha256(f"{out.rstrip('/')}\0{sorted(splits)}".encode()).hexdigest()[:16]
    return base / f"shards-work-{name}"


def converted_key(split_dir: Path) -> str | None:
    """The key of the complete conversion a work split directory holds, if it holds one."""
    try:
        return (split_dir / CONVERTED).read_text() if (split_dir / MANIFEST_NAME).is_file() else None
    except OSError:
        return None


def mark_converted(split_dir: Path, key: str) -> None:
    write_atomic(split_dir / CONVERTED, key)


def clear_work_directory(work: Path) -> None:
    """Everything in a work directory but its lock, which goes on release."""
    for leftover in work.iterdir():
        if leftover.name != LOCK:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def _uploaded(fs: AbstractFileSystem, staging: str, key: str) -> dict[str, dict[str, Any]]:
    """Shards an earlier upload of the same manifest recorded under ``staging``."""
    try:
        data = json.loads(fs.cat_file(posixpath.join(staging, PROGRESS)))
    except (FileNotFoundError, ValueError):
        return {}
    return data.get("shards", {}) if data.get("key") == key else {}


def _still_there(fs: AbstractFileSystem, path: str, shard: ShardInfo, recorded: dict[str, Any] | None) -> bool:
    if recorded != {"bytes": shard.bytes, "sha256": shard.sha256}:
        return False
    try:
        return int(fs.info(path)["size"]) == shard.bytes
    except FileNotFoundError:
        return False


def upload_split(local: Path, url: str, manifest: Manifest, storage_options: dict[str, Any] | None = None) -> None:
    """Upload one converted split directory to ``url`` (shards, then the manifest last),
    skipping shards an interrupted upload of the same manifest already put in staging."""
    fs, root = url_to_fs(url, **(storage_options or {}))
    key = hashlib.sha256(manifest.to_json().encode()).hexdigest()
    staging = posixpath.join(root, ".staging", key[:16])
    local_manifest = (local / MANIFEST_NAME).read_bytes()
    try:
        if _same_manifest(fs, posixpath.join(root, MANIFEST_NAME), local_manifest):
            log.info("%s: already published with this manifest; not uploaded again", url)
            return
        done = _uploaded(fs, staging, key)
        skipped = 0
        for shard in manifest.shards:
            target = posixpath.join(staging, shard.name)
            if _still_there(fs, target, shard, done.get(shard.name)):
                skipped += 1
                continue
            fs.put_file(str(local / shard.name), target)
            done[shard.name] = {"bytes": shard.bytes, "sha256": shard.sha256}
            fs.pipe_file(posixpath.join(staging, PROGRESS), json.dumps({"key": key, "shards": done}).encode())
        if skipped:
            log.info("%s: %d shard(s) already uploaded by an interrupted run; kept", url, skipped)
        with contextlib.suppress(FileNotFoundError):  # first: an earlier output's manifest must not list new shards
            fs.rm_file(posixpath.join(root, MANIFEST_NAME))
        for shard in manifest.shards:
            fs.copy(posixpath.join(staging, shard.name), posixpath.join(root, shard.name))
        fs.pipe_file(posixpath.join(root, MANIFEST_NAME), local_manifest)
    except UPLOAD_ERRORS as e:
        raise ConversionError(f"{url}: upload failed ({e}); no manifest was written there, and running the same "
                              "conversion again uploads only the missing shards") from e
    log.info("uploaded %d shards and the manifest to %s", len(manifest.shards), url)
    try:
        fs.rm(staging, recursive=True)
    except UPLOAD_ERRORS as e:
        log.warning("%s: published, but its staging objects under %s could not be removed (%s)", url, staging, e)


def _same_manifest(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    try:
        return bool(fs.cat_file(path) == data)
    except FileNotFoundError:
        return False


def is_remote_output(out: str | Path) -> bool:
    return isinstance(out, str) and is_remote(out)
