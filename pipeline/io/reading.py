"""Reading shard sets from local disk or any fsspec URL: a shard's embedded header (with its
size), a split's manifest, a shard's samples as ``(key, {extension: bytes})``, and image
decoding for tools. Every failure is a project error naming the URL
(:func:`~pipeline.io.storage.remote_errors`)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import ManifestError, ShardFormatError
from pipeline.format.header import read_header_from
from pipeline.format.manifest import MAX_MANIFEST_BYTES, Manifest
from pipeline.format.schema import DatasetSchema, ImageSpec
from pipeline.format.shard_index import index_shard
from pipeline.io.storage import filesystem, is_remote, local_file_size, read_shard, remote_errors

Sample = tuple[str, dict[str, bytes]]


def read_header(url: str, storage_options: dict[str, Any] | None = None) -> DatasetSchema:
    """Read the schema embedded in the shard at ``url`` (local path or fsspec URL)."""
    return read_header_and_size(url, storage_options)[0]


def read_header_and_size(url: str, storage_options: dict[str, Any] | None = None) -> tuple[DatasetSchema, int | None]:
    """The schema embedded in the shard at ``url`` and the shard's size in bytes (None
    where the file system does not say), from one open that reads only the header."""
    if not is_remote(url):
        local_file_size(url)  # a regular file: a named pipe would block the open
    with remote_errors(url, ShardFormatError, options=storage_options):
        fs, path = filesystem(url, storage_options)
        with fs.open(path, "rb") as f:
            size = getattr(f, "size", None)
            return read_header_from(f, url), size if isinstance(size, int) else None


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read a manifest from a local path or fsspec URL (at most ``MAX_MANIFEST_BYTES``)."""
    with remote_errors(url, ManifestError, "manifest", storage_options):
        fs, path = filesystem(url, storage_options)
        with fs.open(path, "rb") as f:
            return Manifest.from_json(f.read(MAX_MANIFEST_BYTES + 1), where=url)


def iter_shard(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[Sample]:
    """Samples of one shard in order, as ``(key, {extension: bytes})``; the ``__header__``
    and ``__labels__`` members are not samples."""
    index = index_shard(read_shard(url, storage_options=storage_options), url)
    for i, key in enumerate(index.keys):
        members = {ext: index.member(ext, i) for ext in index.offsets}
        yield key, {ext: bytes(data) for ext, data in members.items() if data is not None}


def decode_image(spec: ImageSpec, data: bytes, where: str = "image") -> np.ndarray:
    """An image member as a (C, H, W) uint8 array, following the header's image spec."""
    if spec.encoding == "raw":
        if len(data) != spec.nbytes:
            raise ShardFormatError(f"{where}: raw image expected {spec.nbytes} bytes "
                                   f"({spec.describe()}), found {len(data)}")
        array = np.frombuffer(data, dtype=np.uint8)
        channels, height, width = spec.shape_chw
        if spec.layout == "CHW":
            return array.reshape(channels, height, width)
        return array.reshape(height, width, channels).transpose(2, 0, 1)
    try:
        with Image.open(io.BytesIO(data)) as img:
            hwc = np.asarray(img.convert("L" if spec.channels == 1 else "RGB"))
    except (OSError, ValueError) as e:
        raise ShardFormatError(f"{where}: {spec.encoding} image does not decode ({e})") from e
    return (hwc[:, :, None] if hwc.ndim == 2 else hwc).transpose(2, 0, 1)
