"""Resumable staging: which shards of an interrupted conversion are sound and can be kept.

While a split is written, ``OUT/<split>/.staging/progress.json`` records every finished
shard (name, samples, bytes, sha256) under a key that fingerprints everything the shards
depend on: the schema, the sample order, the shard limits, and the source files' sizes and
modification times. A re-run with the same key keeps the longest prefix of recorded shards
whose files still hash to what was recorded, and writes only the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.manifest import ShardInfo
from pipeline.schema import DatasetSchema

log = logging.getLogger(__name__)

PROGRESS = "progress.json"


def source_fingerprint(src: Path) -> str:
    """Hash of every source file's relative path, size and modification time (a file
    source: its own size and time)."""
    digest = hashlib.sha256()
    if src.is_file():
        stat = src.stat()
        digest.update(f"{src.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    for rel, size, mtime in sorted(_walk(str(src), "")):
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def _walk(root: str, rel: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under ``root`` (``os.scandir``, no
    ``Path`` objects: a million-file source is listed in seconds, not minutes)."""
    found: list[tuple[str, int, int]] = []
    with os.scandir(root) as entries:
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir():
                found.extend(_walk(entry.path, name))
            elif entry.is_file():
                stat = entry.stat()
                found.append((name, stat.st_size, stat.st_mtime_ns))
    return found


def resume_key(schema: DatasetSchema, order: Sequence[int], source: str, limits: tuple[int | None, int | None]) -> str:
    """What a set of staged shards depends on, as one hash."""
    digest = hashlib.sha256(schema.to_json().encode())
    digest.update(np.asarray(order, dtype=np.int64).tobytes())
    digest.update(f"{source}\0{limits}".encode())
    return digest.hexdigest()


def record(staging: Path, key: str, shards: Sequence[ShardInfo]) -> None:
    """Write the progress record (atomically) after a shard is finished."""
    data = {"key": key, "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256}
                                   for s in shards]}
    write_atomic(staging / PROGRESS, json.dumps(data))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` under a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def resume(staging: Path, key: str, prefix: bool = True) -> list[ShardInfo]:
    """The sound shards of an interrupted run: its recorded shards whose files still hash to
    what was recorded (only the first ones up to an unsound one when ``prefix``, as a
    sequential writer needs). Everything else in ``staging`` is removed. Empty when there
    is no record, or it was made for other input or settings."""
    try:
        data = json.loads((staging / PROGRESS).read_text())
    except (OSError, ValueError):
        data = {}
    kept: list[ShardInfo] = []
    if data.get("key") == key:
        for entry in data.get("shards", []):
            info = ShardInfo(**entry)
            path = staging / info.name
            if not path.is_file() or path.stat().st_size != info.bytes or file_sha256(path) != info.sha256:
                log.warning("%s: not as recorded; written again%s", path, " with the shards after it" if prefix else "")
                if prefix:
                    break
                continue
            kept.append(info)
    names = {s.name for s in kept}
    for path in staging.iterdir():
        if path.name not in names and path.name != PROGRESS:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if kept:
        log.info("%s: resuming after %d sound shard(s), %d samples", staging.parent, len(kept),
                 sum(s.samples for s in kept))
    return kept
