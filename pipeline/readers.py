"""Plain readers: a shard's samples as ``(key, {extension: bytes})`` and image decoding."""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from pipeline.errors import ShardFormatError
from pipeline.header import HEADER_MEMBER
from pipeline.schema import ImageSpec

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension rule
Sample = tuple[str, dict[str, bytes]]


def iter_shard(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[Sample]:
    """Samples of one shard in order, grouped by key; the header member is skipped."""
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f, \
                tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                match = _KEY_EXT.match(info.name)
                if info.name == HEADER_MEMBER or not info.isfile() or not match:
                    continue
                if match[1] != key and key is not None:
                    yield key, members
                    members = {}
                key = match[1]
                member = tar.extractfile(info)
                members[match[2]] = member.read() if member else b""
    except tarfile.TarError as e:
        raise ShardFormatError(f"{url}: tar unreadable after sample {key!r} ({e})") from e
    if key is not None:
        yield key, members


def decode_image(spec: ImageSpec, data: bytes, where: str = "image") -> np.ndarray:
    """An image member as a (C, H, W) uint8 array, following the header's image spec."""
    if spec.encoding == "raw":
        if len(data) != spec.nbytes:
            raise ShardFormatError(f"{where}: raw image expected {spec.nbytes} bytes "
                                   f"({spec.describe()}), found {len(data)}")
        array = np.frombuffer(data, dtype=np.uint8)
        if spec.layout == "CHW":
            return array.reshape(spec.shape_chw)
        return array.reshape(spec.height, spec.width, spec.channels).transpose(2, 0, 1)
    try:
        with Image.open(io.BytesIO(data)) as img:
            hwc = np.asarray(img.convert("L" if spec.channels == 1 else "RGB"))
    except (OSError, ValueError) as e:
        raise ShardFormatError(f"{where}: {spec.encoding} image does not decode ({e})") from e
    return (hwc[:, :, None] if hwc.ndim == 2 else hwc).transpose(2, 0, 1)
