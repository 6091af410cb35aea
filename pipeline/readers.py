"""Plain readers: a shard's samples as ``(key, {extension: bytes})`` and image decoding."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import ShardFormatError
from pipeline.schema import ImageSpec
from pipeline.storage import read_shard
from pipeline.tario import index_shard

Sample = tuple[str, dict[str, bytes]]


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
