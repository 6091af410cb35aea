"""Resumable staging: which shards of an interrupted conversion are sound and can be kept.

While a split is written, ``OUT/<split>/.staging/progress.jsonl`` records every finished
shard (name, samples, bytes, sha256; one line appended per shard) under a key that
fingerprints everything the shards depend on: the schema, the sample order, the shard
limits, and the source files' sizes and modification times. A re-run with the same key
keeps the longest prefix of recorded shards whose files still hash to what was recorded,
and writes only the rest.
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

from pipeline.format.manifest import ShardInfo
from pipeline.format.schema import DatasetSchema

log = logging.getLogger(__name__)

PROGRESS = "progress.jsonl"


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


def start_progress(path: Path, key: str, kept: Sequence[ShardInfo] = ()) -> None:
    """Start a progress record at ``path``: the key, then the shards already kept (atomic)."""
    write_atomic(path, "".join(json.dumps(line) + "\n" for line in [{"key": key}, *map(vars, kept)]))


def append_progress(path: Path, shard: ShardInfo) -> None:
    """Record one finished shard: one appended line, one write (no rename: replacing a file
    costs about 1 ms on ext4, which flushes it first, and this runs once per shard)."""
    with open(path, "a") as f:
        f.write(json.dumps(vars(shard)) + "\n")


def read_progress(path: Path, key: str) -> list[ShardInfo]:
    """The shards recorded at ``path`` under ``key``: none when there is no record or it was
    made for another key. A line cut short by a kill is ignored (its shard is written again)."""
    try:
        lines = path.read_text().splitlines()
        first = json.loads(lines[0]) if lines else {}
    except (OSError, ValueError):
        return []
    if not isinstance(first, dict) or first.get("key") != key:
        return []
    shards = []
    for line in lines[1:]:
        try:
            shards.append(ShardInfo(**json.loads(line)))
        except (ValueError, TypeError):
            log.warning("%s: ignoring a line cut short: %.60r", path, line)
    return shards


def empty_slice(name: str) -> ShardInfo:
    """The progress record of a planned slice whose every sample the format skipped: no
    file (a written shard has at least one sample), recorded so a resume skips it too."""
    return ShardInfo(name=name, samples=0, bytes=0, sha256="")


def is_sound(path: Path, shard: ShardInfo) -> bool:
    """Whether ``path`` still holds the shard as recorded (size and sha256); an empty
    slice's record always is."""
    if shard.samples == 0:
        return True
    return path.is_file() and path.stat().st_size == shard.bytes and file_sha256(path) == shard.sha256


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
    sequential writer needs). Everything else in ``staging`` is removed and the record
    restarts with the kept shards. Empty when there is no record, or it was made for other
    input or settings."""
    kept: list[ShardInfo] = []
    for info in read_progress(staging / PROGRESS, key):
        path = staging / info.name
        if not is_sound(path, info):
            log.warning("%s: not as recorded; written again%s", path, " with the shards after it" if prefix else "")
            if prefix:
                break
            continue
        kept.append(info)
    names = {s.name for s in kept}
    for path in staging.iterdir():
        if path.name not in names:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    start_progress(staging / PROGRESS, key, kept)
    if kept:
        log.info("%s: resuming after %d sound shard(s), %d samples", staging.parent, len(kept),
                 sum(s.samples for s in kept))
    return kept
