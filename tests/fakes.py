"""Tiny shard sets in the schemas of the datasets the experiments name (until their converters
exist, CIFAR-100-MH- and ImageNet-100-like shards are written straight with the writer)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.format.labels import encode_labels
from pipeline.format.schema import DatasetSchema, Head, ImageSpec, Provenance
from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh
from shard_tools.writer import ShardWriter


def vimh_shards(root: Path, n_train: int = 64, n_test: int = 32, size: int = 16, channels: int = 3) -> Path:
    src = generate_vimh(root / f"vimh-{size}x{size}x{channels}_t", n_train=n_train, n_test=n_test, height=size,
                        width=size, channels=channels, n_heads=2)
    convert("vimh", src, root / "vimh", max_samples=32)
    return root / "vimh"


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def class_shards(root: Path, kind: str, n: int = 48, seed: int = 0) -> Path:
    """``cifar100mh``: 32x32x3 raw CHW, heads fine (100) and coarse (20), splits train/test.
    ``imagenet100``: JPEGs of varying sizes (24 to 48 pixels a side), one head ``label`` (100),
    splits train/val."""
    rng = np.random.default_rng(seed)
    if kind == "cifar100mh":
        image = ImageSpec(32, 32, 3)
        heads: tuple[Head, ...] = (Head(name="fine", kind="class", num_classes=100),
                                   Head(name="coarse", kind="class", num_classes=20))
        splits = ("train", "test")
    else:
        image = ImageSpec(None, None, 3, encoding="jpg", layout="HWC")
        heads = (Head(name="label", kind="class", num_classes=100),)
        splits = ("train", "val")
    for split in splits:
        schema = DatasetSchema(name=f"{kind}-fake", split=split, image=image, heads=heads,
                               provenance=Provenance(source_format="test-fake"))
        with ShardWriter(root / kind / split, schema, max_samples=32) as writer:
            for i in range(n):
                size = (32, 32) if image.fixed_size else tuple(int(x) for x in rng.integers(24, 49, 2))
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                data = _jpeg(pixels) if image.encoding == "jpg" else pixels.transpose(2, 0, 1).tobytes()
                labels = {h.name: {"class": int(rng.integers(0, h.num_classes))} for h in heads}
                writer.write(f"{i:08d}", [(image.encoding, data), ("labels.msgpack", encode_labels(labels))])
    return root / kind
