"""The one shard writer: deterministic, atomic POSIX tar shards with an embedded header.

Every shard starts with the ``__header__`` member, then each sample's members in the
order given. Tar headers carry fixed metadata (mtime 0, uid/gid 0, mode 0644), so the
same samples in the same order give byte-identical shards. Shards are written under a
hidden staging directory and moved into place, with the manifest last, only when the
whole split is complete; a failed run removes its staging directory and leaves any
earlier output untouched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal

from pipeline.errors import ConversionError
from pipeline.header import HEADER_MEMBER, header_bytes
from pipeline.manifest import MANIFEST_NAME, Manifest, ShardInfo
from pipeline.schema import DatasetSchema

log = logging.getLogger(__name__)

BLOCK = 512
RECORD = 20 * BLOCK
DEFAULT_MAX_SAMPLES = 10_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
STAGING_DIR = ".staging"


def _reference_header(name: str, size: int, fmt: Literal[0, 1, 2] = tarfile.USTAR_FORMAT) -> bytes:
    """A tar header built by :mod:`tarfile` with this writer's fixed metadata."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    return info.tobuf(format=fmt, encoding="utf-8", errors="strict")


# tarfile's header of an empty name and size, with the checksum field as spaces: every
# member's header is this template plus its name and size, and a recomputed checksum.
_TEMPLATE = bytearray(_reference_header("x", 0))
_TEMPLATE[0:100] = bytes(100)
_TEMPLATE[124:136] = bytes(12)
_TEMPLATE[148:156] = b" " * 8
_TEMPLATE_SUM = sum(_TEMPLATE)
_MAX_FAST_SIZE = 8**11 - 1


def tar_header(name: str, size: int) -> bytes:
    """The ustar header block of one member; byte-identical to tarfile's (tested), about
    five times faster, which is most of the conversion time for small images. Names over
    100 bytes or members of 8 GiB and more get a POSIX pax extended header instead."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size > _MAX_FAST_SIZE:
        return _reference_header(name, size, tarfile.PAX_FORMAT)
    size_field = b"%011o\0" % size
    header = bytearray(_TEMPLATE)
    header[0:len(raw)] = raw
    header[124:136] = size_field
    header[148:155] = b"%06o\0" % (_TEMPLATE_SUM + sum(raw) + sum(size_field))
    return bytes(header)


def tar_member(name: str, data: bytes) -> bytes:
    """One ustar member (header block, data, zero padding) with fixed metadata."""
    return tar_header(name, len(data)) + data + bytes(-len(data) % BLOCK)


def tar_end(size_so_far: int) -> bytes:
    """End-of-archive: two zero blocks, then zeros up to a whole 10 KiB record."""
    size = size_so_far + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-size % RECORD))


class _HashingFile:
    """A write-only file that tracks sha256 and size as bytes go through."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self._sha.update(data)
        self.size += len(data)

    def close(self) -> str:
        self._f.close()
        return self._sha.hexdigest()


class ShardWriter:
    """Write one split's samples into size-limited shards plus a manifest.

    ``max_samples`` and ``max_bytes`` bound each shard (either may be ``None``); a shard
    always holds at least one sample. Use as a context manager: leaving the block
    normally publishes the shards and manifest (or, with ``publish_on_exit=False``,
    leaves them staged for :meth:`publish`); leaving it with an error publishes nothing.
    """

    def __init__(self, out_dir: str | os.PathLike[str], schema: DatasetSchema, *,
                 max_samples: int | None = DEFAULT_MAX_SAMPLES,
                 max_bytes: int | None = DEFAULT_MAX_BYTES, publish_on_exit: bool = True) -> None:
        if max_samples is not None and max_samples < 1:
            raise ConversionError(f"max_samples: expected >= 1, found {max_samples}")
        if max_bytes is not None and max_bytes < 1:
            raise ConversionError(f"max_bytes: expected >= 1, found {max_bytes}")
        self.out_dir = Path(out_dir)
        self.schema = schema
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.publish_on_exit = publish_on_exit
        self._header = tar_member(HEADER_MEMBER, header_bytes(schema))
        self._staging = self.out_dir / STAGING_DIR
        self._shards: list[ShardInfo] = []
        self._file: _HashingFile | None = None
        self._count = 0
        self.manifest: Manifest | None = None

    def __enter__(self) -> ShardWriter:
        if self._staging.exists():
            shutil.rmtree(self._staging)
        self._staging.mkdir(parents=True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
            return
        self._finish()
        if self.publish_on_exit:
            self.publish()

    def write(self, key: str, members: Sequence[tuple[str, bytes]]) -> None:
        """Append one sample: ``members`` are ``(extension, data)`` pairs, written in order."""
        blob = b"".join(tar_member(f"{key}.{ext}", data) for ext, data in members)
        shard = self._file
        if shard is not None and self._full(shard, len(blob)):
            self._finish_shard(shard)
            shard = None
        if shard is None:
            shard = self._start_shard()
        shard.write(blob)
        self._count += 1

    def _full(self, shard: _HashingFile, incoming: int) -> bool:
        if self.max_samples is not None and self._count >= self.max_samples:
            return True
        end = shard.size + incoming + 2 * BLOCK
        return self.max_bytes is not None and end + (-end % RECORD) > self.max_bytes

    def _shard_name(self, index: int) -> str:
        return f"{self.schema.split}-{index:06d}.tar"

    def _start_shard(self) -> _HashingFile:
        name = self._shard_name(len(self._shards))
        self._file = _HashingFile(self._staging / f"{name}.partial")
        self._file.write(self._header)
        self._count = 0
        return self._file

    def _finish_shard(self, shard: _HashingFile) -> None:
        shard.write(tar_end(shard.size))
        sha = shard.close()
        final = shard.path.with_suffix("")  # drop ".partial"
        os.replace(shard.path, final)
        self._shards.append(ShardInfo(final.name, self._count, shard.size, sha))
        self._file = None

    def _finish(self) -> None:
        if self._file is not None:
            self._finish_shard(self._file)
        if not self._shards:
            self.abort()
            raise ConversionError(f"{self.out_dir}: no samples were written for split "
                                  f"{self.schema.split!r}")

    def publish(self) -> Manifest:
        """Move the staged shards into place, replacing the split's old shards, then write
        the manifest last."""
        manifest = Manifest(schema=self.schema, shards=tuple(self._shards))
        old_manifest = self.out_dir / MANIFEST_NAME
        old_manifest.unlink(missing_ok=True)
        keep = {s.name for s in self._shards}
        for stale in self.out_dir.glob(f"{self.schema.split}-*.tar"):
            if stale.name not in keep:
                stale.unlink()
        for shard in self._shards:
            os.replace(self._staging / shard.name, self.out_dir / shard.name)
        tmp = self._staging / MANIFEST_NAME
        tmp.write_text(manifest.to_json())
        os.replace(tmp, old_manifest)
        shutil.rmtree(self._staging)
        log.info("wrote %d samples in %d shards to %s", manifest.num_samples,
                 len(manifest.shards), self.out_dir)
        self.manifest = manifest
        return manifest

    def abort(self) -> None:
        """Drop everything staged; earlier output in ``out_dir`` stays as it was."""
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self._staging, ignore_errors=True)
