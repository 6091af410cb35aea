"""Conversion straight to object storage: ``OUT`` as ``s3://bucket/prefix`` (any fsspec URL).

The shards are made in a local work directory exactly as for a local ``OUT`` (so every
guarantee of the local writer holds, resume included), then uploaded split by split:
shards first under ``<split>/.staging/``, then copied to their names (a server-side copy on
S3), then the manifest last, then the staging objects deleted. A split therefore has a
manifest only once all its shards are in place, and a failed upload leaves nothing but
``.staging`` objects, which no reader lists.

Resume: the work directory stays after a failure (default: under ``$XDG_CACHE_HOME``,
named after ``OUT``), and ``<split>/.staging/progress.json`` records each shard uploaded
(name, bytes, sha256) for this manifest. Running the same conversion again converts only
what the local staging lacks and uploads only shards not recorded with the same sha256
and size; the work directory is removed once every split is published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from pipeline.errors import ConversionError
from pipeline.manifest import MANIFEST_NAME, Manifest, ShardInfo
from pipeline.storage import REMOTE_ERRORS, is_remote

log = logging.getLogger(__name__)
UPLOAD_ERRORS: tuple[type[BaseException], ...] = (PermissionError, *REMOTE_ERRORS)
PROGRESS = "progress.json"


def default_work_dir(out: str) -> Path:
    """Where a conversion to ``out`` builds its shards: one directory per output URL."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "multihead-shards" / "convert" / hashlib.sha256(out.encode()).hexdigest()[:16]


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
    staging = posixpath.join(root, ".staging")
    key = hashlib.sha256(manifest.to_json().encode()).hexdigest()
    try:
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
        for shard in manifest.shards:
            fs.copy(posixpath.join(staging, shard.name), posixpath.join(root, shard.name))
        fs.put_file(str(local / MANIFEST_NAME), posixpath.join(root, MANIFEST_NAME))
        fs.rm([posixpath.join(staging, s.name) for s in manifest.shards] + [posixpath.join(staging, PROGRESS)])
    except UPLOAD_ERRORS as e:
        raise ConversionError(f"{url}: upload failed ({e}); no manifest was written there, and running the same "
                              "conversion again uploads only the missing shards") from e
    log.info("uploaded %d shards and the manifest to %s", len(manifest.shards), url)


def is_remote_output(out: str | Path) -> bool:
    return isinstance(out, str) and is_remote(out)
