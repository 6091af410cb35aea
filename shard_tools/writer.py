"""The one shard writer: deterministic, atomic POSIX tar shards with an embedded header.

Every shard starts with the ``__header__`` member, then each sample's members in the
order given. Tar headers carry fixed metadata (mtime 0, uid/gid 0, mode 0644), so the
same samples in the same order give byte-identical shards, whether they come one at a
time (:meth:`ShardWriter.write`) or as blocks whose tar members are built with numpy in
one go (:meth:`ShardWriter.write_block`, the converter's path). Shards are written under a
hidden staging directory and moved into place, with the manifest last, only when the
whole split is complete; a failed run removes its staging directory and leaves any
earlier output untouched.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

import numpy as np

from pipeline.errors import ConversionError
from pipeline.format.header import HEADER_MEMBER, header_bytes
from pipeline.format.label_columns import LABELS_MEMBER, Columns, encode_label_columns
from pipeline.format.manifest import MANIFEST_NAME, Manifest, ShardInfo
from pipeline.format.schema import DatasetSchema
from pipeline.format.tar_write import (
    BLOCK,
    RECORD,
    Member,
    Rows,
    tar_block,
    tar_end,
    tar_header,
    tar_member,
    tar_pieces,
)
from pipeline.io.shard_sets import STAGING_DIR
from shard_tools import staging
from shard_tools.hashing_file import HashingFile, WriteBehind

log = logging.getLogger(__name__)

DEFAULT_MAX_SAMPLES = 10_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class Staged(Protocol):
    """A split whose shards wait in staging: ``publish()`` moves them into place, manifest
    last; ``abort()`` drops them. The writer is one; a split written by several processes
    (:class:`~shard_tools.conversion.slices.StagedSplit`) another."""

    schema: DatasetSchema

    def publish(self) -> Manifest: ...

    def abort(self) -> None: ...


def report_skipped(split_dir: Path, planned: int, written: int) -> None:
    """One summary line when a format skipped samples as bad input (each one was warned about)."""
    if written < planned:
        log.warning("%s: %d of %d samples skipped as bad input (see the warnings above); %d written",
                    split_dir, planned - written, planned, written)


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def publish_staged(out_dir: Path, staging_dir: Path, schema: DatasetSchema, shards: Sequence[ShardInfo]) -> Manifest:
    """Move staged shards into ``out_dir``, replacing the split's old shards, then write the
    manifest last and remove the staging directory."""
    manifest = Manifest(schema=schema, shards=tuple(shards))
    old_manifest = out_dir / MANIFEST_NAME
    old_manifest.unlink(missing_ok=True)
    keep = {s.name for s in shards}
    for stale in out_dir.glob(f"{schema.split}-*.tar"):
        if stale.name not in keep:
            stale.unlink()
    for shard in shards:
        os.replace(staging_dir / shard.name, out_dir / shard.name)
    tmp = staging_dir / MANIFEST_NAME
    tmp.write_text(manifest.to_json())
    os.replace(tmp, old_manifest)
    shutil.rmtree(staging_dir)
    log.info("wrote %d samples in %d shards to %s", manifest.num_samples, len(manifest.shards), out_dir)
    return manifest


def _rows(labels: Columns | None, start: int, stop: int) -> Columns | None:
    """Rows ``start:stop`` of label columns."""
    if labels is None:
        return None
    return ({k: v[start:stop] for k, v in labels[0].items()}, {k: v[start:stop] for k, v in labels[1].items()})


class ShardWriter:
    """Write one split's samples into size-limited shards plus a manifest.

    ``max_samples`` and ``max_bytes`` bound each shard (either may be ``None``); a shard
    always holds at least one sample. Use as a context manager: leaving the block
    normally publishes the shards and manifest (or, with ``publish_on_exit=False``,
    leaves them staged for :meth:`publish`); leaving it with an error publishes nothing.

    With ``shared=True`` the staging directory belongs to a caller that runs several
    writers (processes writing a split's shards, numbered by :meth:`next_shard`): it is
    neither cleared nor resumed, finished shards stay in it under their final names and
    are recorded in ``progress``, and nothing is published. ``write_behind=False`` hashes and
    writes in the calling thread (see :class:`~shard_tools.hashing_file.WriteBehind`).
    """

    def __init__(self, out_dir: str | os.PathLike[str], schema: DatasetSchema, *,
                 max_samples: int | None = DEFAULT_MAX_SAMPLES,
                 max_bytes: int | None = DEFAULT_MAX_BYTES, publish_on_exit: bool = True,
                 resume_key: str | None = None, first_index: int = 0, staging_dir: str = STAGING_DIR,
                 shared: bool = False, progress: Path | None = None, write_behind: bool = True) -> None:
        if max_samples is not None and max_samples < 1:
            raise ConversionError(f"max_samples: expected >= 1, found {max_samples}")
        if max_bytes is not None and max_bytes < 1:
            raise ConversionError(f"max_bytes: expected >= 1, found {max_bytes}")
        self.out_dir = Path(out_dir)
        self.schema = schema
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.publish_on_exit = publish_on_exit
        self.resume_key = resume_key  # keep sound shards of an interrupted run with this key
        self._header = tar_member(HEADER_MEMBER, header_bytes(schema))
        self._staging = self.out_dir / staging_dir
        self.shared = shared
        self._progress = progress if shared else (None if resume_key is None else self._staging / staging.PROGRESS)
        self.first_index = first_index  # number of the first shard (a node writes shards i, i+N, ...)
        self._shards: list[ShardInfo] = []  # finished shards: appended on the write-behind thread
        self._started = 0  # shards started, kept ones included (names the next one)
        self._writes = WriteBehind(threaded=write_behind)  # sha256 and writes on a thread of their own
        self._unfinished: set[Path] = set()  # .partial files not yet renamed (the thread removes them)
        self._file: HashingFile | None = None
        self._count = 0
        self._columns: list[Columns] | None = []  # label columns of the open shard, None once a sample lacks them
        self.manifest: Manifest | None = None

    def __enter__(self) -> ShardWriter:
        if self.shared:
            self._staging.mkdir(parents=True, exist_ok=True)
        elif self.resume_key is not None and self._staging.is_dir():
            self._shards = staging.resume(self._staging, self.resume_key)
            self._started = len(self._shards)
        else:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging.mkdir(parents=True)
            if self._progress is not None and self.resume_key is not None:
                staging.start_progress(self._progress, self.resume_key)
        return self

    @property
    def staging_dir(self) -> Path:
        return self._staging

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self._after_error(exc_type)
            return
        try:
            self._finish()  # may raise the error of a write still in flight
        except BaseException as e:
            self._after_error(type(e))
            raise
        if self.publish_on_exit and not self.shared:
            self.publish()

    def _after_error(self, exc_type: type[BaseException]) -> None:
        """An error drops everything staged; an interrupt keeps finished shards for a resume."""
        if issubclass(exc_type, Exception) or self._progress is None:
            self.abort()
        else:
            self._drop_open_shard()

    @property
    def shards(self) -> list[ShardInfo]:
        """The finished shards (complete once the ``with`` block is left)."""
        return list(self._shards)

    def next_shard(self, index: int) -> None:
        """Finish the open shard, if any; the next sample starts shard number ``index``
        (never one used before), so a shard can hold exactly a planned slice of samples."""
        if self.first_index + self._started > index:
            raise ConversionError(f"{self._staging}: shard {index} asked for after shard "
                                  f"{self.first_index + self._started - 1}; shard numbers only go up")
        if self._file is not None:
            self._finish_shard(self._file)
        self._started = index - self.first_index

    def write(self, key: str, members: Sequence[tuple[str, bytes]], labels: Columns | None = None) -> None:
        """Append one sample: ``members`` are ``(extension, data)`` pairs, written in order.
        ``labels`` (per-head class and value columns of length 1) go into the shard's
        ``__labels__`` member; a shard gets one only if every sample came with them."""
        pieces: list[bytes] = []
        for ext, data in members:  # header, data, padding: written as they are, not joined
            if not isinstance(data, bytes):  # held until the next flush: never a buffer the caller may reuse
                data = memoryview(data).tobytes()
            pieces += [tar_header(f"{key}.{ext}", len(data)), data, bytes(-len(data) % BLOCK)]
        self._write_samples(lambda start, stop: pieces, np.array([sum(map(len, pieces))]), labels)  # 1 sample

    def _add_columns(self, labels: Columns | None) -> None:
        if self._columns is not None:
            if labels is None:
                self._columns = None
            else:
                self._columns.append(labels)

    def write_block(self, keys: Sequence[str], members: Sequence[tuple[str, Member]],
                    labels: Columns | None = None) -> None:
        """Append ``len(keys)`` samples at once, as :meth:`write` would one by one:
        ``members`` are ``(extension, data)`` pairs, data holding one entry per sample;
        ``labels`` are the block's per-head class and value columns."""
        if not len(keys):
            return
        blob = tar_block(keys, members)
        if blob is not None:  # every sample the same size: one row of one array each, rows written together
            self._write_samples(lambda start, stop: [blob[start:stop].data], np.full(len(blob), blob.shape[1]),
                                labels)
            return
        laid_out = tar_pieces(keys, members)
        if laid_out is not None:
            pieces, k, sizes = laid_out
            self._write_samples(lambda start, stop: pieces[start * k:stop * k], sizes, labels)
            return
        for i, key in enumerate(keys):  # names tarfile must write (pax headers)
            self.write(key, [(ext, rows.row(i) if isinstance(rows, Rows) else rows[i])
                             for ext, rows in members], _rows(labels, i, i + 1))

    def _write_samples(self, pieces: Callable[[int, int], Sequence[bytes | memoryview]], sizes: np.ndarray,
                       labels: Columns | None) -> None:
        """Write samples of ``sizes`` bytes, ``pieces(start, stop)`` giving the bytes of
        samples ``start:stop``, starting a new shard wherever a limit says so (a shard always
        takes at least one sample)."""
        pos = 0
        while pos < len(sizes):
            shard = self._file or self._start_shard()
            room = self._room(shard, sizes[pos:])
            if room < 1 and self._count:
                self._finish_shard(shard)
                continue
            take = min(max(room, 1), len(sizes) - pos)
            shard.write_many(pieces(pos, pos + take))
            self._count += take
            self._add_columns(_rows(labels, pos, pos + take))
            pos += take

    def _room(self, shard: HashingFile, sizes: np.ndarray) -> int:
        """How many of the next samples, of ``sizes`` bytes, the open shard takes."""
        room = len(sizes) if self.max_samples is None else min(len(sizes), self.max_samples - self._count)
        if self.max_bytes is not None:  # leave room for end blocks, record padding, __labels__
            per_label = self._label_bytes if self._columns is not None else 0
            limit = self.max_bytes - self.max_bytes % RECORD - 2 * BLOCK - (3 * BLOCK if per_label else 0)
            budget = limit - shard.size - per_label * self._count
            fits = int(np.searchsorted(np.cumsum(sizes[:max(room, 0)] + per_label), budget, side="right"))
            room = min(room, fits)
        return max(room, 0)

    def _shard_name(self, index: int) -> str:
        return shard_name(self.schema.split, index)

    @property
    def _label_bytes(self) -> int:
        """Bytes one sample adds to the ``__labels__`` member (its framing fits in 3 blocks)."""
        return 4 * (len(self.schema.heads) + sum(h.kind == "quantized" for h in self.schema.heads))

    def _start_shard(self) -> HashingFile:
        name = self._shard_name(self.first_index + self._started)
        self._started += 1
        self._file = HashingFile(self._staging / f"{name}.partial", self._writes)
        self._unfinished.add(self._file.path)
        self._file.write(self._header)
        self._count = 0
        self._columns = []
        return self._file

    def _finish_shard(self, shard: HashingFile) -> None:
        if self._columns:
            classes = {k: np.concatenate([c[0][k] for c in self._columns]) for k in self._columns[0][0]}
            values = {k: np.concatenate([c[1][k] for c in self._columns]) for k in self._columns[0][1]}
            shard.write(tar_member(LABELS_MEMBER, encode_label_columns(classes, values)))
        shard.write(tar_end(shard.size))
        shard.close(functools.partial(self._shard_written, shard.path, self._count, shard.size))
        self._file = None

    def _shard_written(self, partial: Path, count: int, size: int, sha: str) -> None:
        """On the write-behind thread, once a shard's last byte is written: move it to its
        final name and record it (for a resume)."""
        final = partial.with_suffix("")  # drop ".partial"
        os.replace(partial, final)
        self._unfinished.discard(partial)
        info = ShardInfo(final.name, count, size, sha)
        self._shards.append(info)
        if self._progress is not None:
            staging.append_progress(self._progress, info)

    def _finish(self) -> None:
        if self._file is not None:
            self._finish_shard(self._file)
        self._writes.wait()
        if not self._shards and not self.shared:
            self.abort()
            raise ConversionError(f"{self.out_dir}: no samples were written for split "
                                  f"{self.schema.split!r}")

    def publish(self) -> Manifest:
        """Move the staged shards into place, replacing the split's old shards, then write
        the manifest last."""
        self.manifest = publish_staged(self.out_dir, self._staging, self.schema, self._shards)
        return self.manifest

    def _drop_open_shard(self) -> None:
        """Close the open shard without finishing it and wait for the write-behind thread.
        A write error here was raised already, or is what the caller is handling."""
        shard, self._file = self._file, None
        for step in ([shard.discard] if shard is not None else []) + [self._writes.wait]:
            try:
                step()
            except OSError as e:
                log.debug("%s: after a failed write: %s", self._staging, e)

    def abort(self) -> None:
        """Drop everything staged; earlier output in ``out_dir`` stays as it was."""
        self._drop_open_shard()
        if not self.shared:
            shutil.rmtree(self._staging, ignore_errors=True)
        for partial in self._unfinished:  # a shared directory keeps the finished shards: its owner decides
            partial.unlink(missing_ok=True)
        self._unfinished.clear()
