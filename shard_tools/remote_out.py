"""Conversion straight to object storage: ``OUT`` as ``s3://bucket/prefix`` (any fsspec URL).

The shards are made in a local work directory exactly as for a local ``OUT`` (so every
guarantee of the local writer holds), then uploaded split by split: shards first under
``<split>/.staging/``, then copied to their names (a server-side copy on S3), then the
manifest last, then the staging objects deleted. A split therefore has a manifest only
once all its shards are in place, and a failed upload leaves nothing but ``.staging``
objects, which no reader lists.
"""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

from pipeline.errors import ConversionError
from pipeline.manifest import MANIFEST_NAME, Manifest
from pipeline.storage import REMOTE_ERRORS, is_remote

log = logging.getLogger(__name__)
UPLOAD_ERRORS: tuple[type[BaseException], ...] = (PermissionError, *REMOTE_ERRORS)


def upload_split(local: Path, url: str, manifest: Manifest, storage_options: dict[str, Any] | None = None) -> None:
    """Upload one converted split directory to ``url`` (shards, then the manifest last)."""
    fs, root = url_to_fs(url, **(storage_options or {}))
    staging = posixpath.join(root, ".staging")
    try:
        for shard in manifest.shards:
            fs.put_file(str(local / shard.name), posixpath.join(staging, shard.name))
        for shard in manifest.shards:
            fs.copy(posixpath.join(staging, shard.name), posixpath.join(root, shard.name))
        fs.put_file(str(local / MANIFEST_NAME), posixpath.join(root, MANIFEST_NAME))
        fs.rm([posixpath.join(staging, s.name) for s in manifest.shards])
    except UPLOAD_ERRORS as e:
        raise ConversionError(f"{url}: upload failed ({e}); no manifest was written there") from e
    log.info("uploaded %d shards and the manifest to %s", len(manifest.shards), url)


def is_remote_output(out: str | Path) -> bool:
    return isinstance(out, str) and is_remote(out)
