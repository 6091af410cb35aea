"""The loader benchmark's two workloads, generated once per run, and each peer's copy of them.

1. ``raw32``: the synthetic VIMH source (32x32x3 planar raw pixels, two quantized heads),
   converted to our shards with ``convert``.
2. ``jpeg256``: synthetic photo-like 256x256 RGB JPEGs (gradients, waves, shapes and noise,
   quality 90, about 19 KB each) with one 100-class label, written with our ``ShardWriter``.

Every tool reads the same samples. The peers' formats (litdata, MosaicML MDS) are written
from the same bytes in the same order as our shards; their labels are the class indices our
loader yields (``labels[head]``), stored as plain ints.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.format.labels import encode_labels
from pipeline.format.schema import DatasetSchema, Head, ImageSpec
from pipeline.io.reading import read_manifest
from shard_tools.conversion.plan import sample_order
from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh
from shard_tools.writer import ShardWriter

JPEG_SIZE = 256
JPEG_CLASSES = 100
JPEG_QUALITY = 90
RAW_SHARDS = 6  # 10,000 samples each at full size
JPEG_SHARDS = 4  # 1,000 samples each at full size
CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Workload:
    """One benchmark dataset: the samples in the order of our shards, and where each copy lies."""

    name: str
    title: str
    encoding: str  # "raw" (planar CHW bytes) or "jpg"
    shape: tuple[int, int, int]  # C, H, W
    images: list[bytes]
    labels: dict[str, np.ndarray]  # head -> int64 class index per sample
    ours: Path  # shard root holding train/
    source: Path | None = None  # the VIMH source directory (raw32 only)

    @property
    def n(self) -> int:
        return len(self.images)

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(self.labels)


# --- workload 1: VIMH raw pixels ---------------------------------------------------------------

def vimh_classes(source: Path, schema: DatasetSchema) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The pickle's pixels ``(n, C*H*W)`` and every head's class index, in source order."""
    with open(source / "train_batch", "rb") as f:
        batch = pickle.load(f)  # our own synthetic file
    names = json.loads((source / "vimh_dataset_info.json").read_text())["parameter_names"]
    q = {name: np.zeros(len(batch["data"]), np.int64) for name in names}
    for i, lab in enumerate(batch["vimh_labels"]):
        for k in range(1, len(lab), 2):
            q[names[lab[k]]][i] = lab[k + 1]
    classes = {}
    for head in schema.heads:
        table = np.array([head.class_of_quantized(v) for v in range(256)], np.int64)
        classes[head.name] = table[q[head.name]]
    return np.asarray(batch["data"]), classes


def make_raw32(work: Path, n: int, shard_samples: int | None = None) -> Workload:
    """The VIMH source converted in ``RAW_SHARDS`` shards (or shards of ``shard_samples``)."""
    source = generate_vimh(work / "vimh-32x32x3_bench", n_train=n, n_test=16, n_heads=2)
    ours = work / "raw32-ours"
    manifests = convert("vimh", source, ours, splits=["train"], max_samples=shard_samples or -(-n // RAW_SHARDS))
    schema = manifests["train"].schema
    data, classes = vimh_classes(source, schema)
    order = np.array(sample_order(n, shuffle=True, seed=0))  # convert's write order
    images = [data[i].tobytes() for i in order]
    return Workload("raw32", "32x32x3 raw pixels, 2 heads", "raw", schema.image.shape_chw, images,
                    {h: c[order] for h, c in classes.items()}, ours, source)


# --- workload 2: photo-like JPEGs --------------------------------------------------------------

def photo_jpeg(rng: np.random.Generator, noise: np.ndarray, size: int = JPEG_SIZE) -> bytes:
    """One synthetic photo-like RGB JPEG: a colour gradient, a soft wave, a few flat
    shapes, and sensor-like noise (a random crop of a shared noise field)."""
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1, c2 = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * x + np.sin(angle) * y
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    img = c0 * (1 - t)[..., None] + c1 * t[..., None]
    fx, fy = rng.uniform(1, 6, 2)
    wave = np.sin(2 * np.pi * (fx * x + rng.uniform())) * np.cos(2 * np.pi * fy * y)
    img += 30 * wave[..., None] * (c2 / 255)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(20, 120, 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    oy, ox = (int(v) for v in rng.integers(0, noise.shape[0] - size, 2))
    pixels = np.asarray(pil).astype(np.int16) + noise[oy:oy + size, ox:ox + size]
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def jpeg_schema() -> DatasetSchema:
    return DatasetSchema(name="jpeg-bench", split="train",
                         image=ImageSpec(JPEG_SIZE, JPEG_SIZE, 3, encoding="jpg", layout="HWC"),
                         heads=(Head(name="label", kind="class", num_classes=JPEG_CLASSES),))


_NOISE: dict[int, np.ndarray] = {}


def _nth_photo(seed: int, i: int) -> bytes:
    if seed not in _NOISE:
        _NOISE[seed] = np.random.default_rng(seed).normal(0, 8, (2 * JPEG_SIZE, 2 * JPEG_SIZE, 3)).astype(np.int16)
    return photo_jpeg(np.random.default_rng([seed, i]), _NOISE[seed])


def make_jpeg256(work: Path, n: int, seed: int = 0) -> Workload:
    """``n`` photo-like JPEGs (image ``i`` depends only on ``seed`` and ``i``; made on every core)."""
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        images = pool.map(partial(_nth_photo, seed), range(n), chunksize=64)
    classes = np.random.default_rng([seed, n]).integers(0, JPEG_CLASSES, n).astype(np.int64)
    ours = work / "jpeg256-ours"
    with ShardWriter(ours / "train", jpeg_schema(), max_samples=-(-n // JPEG_SHARDS)) as writer:
        for i, (jpeg, c) in enumerate(zip(images, classes.tolist(), strict=True)):
            writer.write(f"{i:08d}", [("jpg", jpeg), ("labels.msgpack", encode_labels({"label": {"class": c}}))])
    return Workload("jpeg256", f"{JPEG_SIZE}x{JPEG_SIZE} RGB JPEG, 1 head", "jpg", (3, JPEG_SIZE, JPEG_SIZE),
                    images, {"label": classes}, ours)


def check_ours(w: Workload) -> None:
    manifest = read_manifest(str(w.ours / "train" / "manifest.json"))
    if manifest.num_samples != w.n:
        raise RuntimeError(f"{w.name}: our shards hold {manifest.num_samples} samples, expected {w.n}")


# --- the peers' copies (untimed) ----------------------------------------------------------------

def _litdata_block(w: Workload, block: range) -> Any:
    for i in block:
        yield {"image": w.images[i], **{h: int(c[i]) for h, c in w.labels.items()}}


def write_litdata(w: Workload, out: Path, block: int = 1000) -> Path:
    """``litdata.optimize`` over blocks of the sample order (one worker, forked)."""
    from litdata import optimize

    for var, sub in (("DATA_OPTIMIZER_CACHE_FOLDER", "chunks"), ("DATA_OPTIMIZER_DATA_CACHE_FOLDER", "data")):
        os.environ[var] = str(out.parent / f"{out.name}-cache" / sub)  # else /tmp/chunks, /tmp/data
    blocks = [range(a, min(a + block, w.n)) for a in range(0, w.n, block)]
    optimize(fn=partial(_litdata_block, w), inputs=blocks, output_dir=str(out), num_workers=1,
             chunk_bytes=CHUNK_BYTES, start_method="fork", reorder_files=False, verbose=False)
    return out


def write_mds(w: Workload, out: Path) -> Path:
    from streaming import MDSWriter

    columns = {"image": "bytes", **dict.fromkeys(w.heads, "int")}
    with MDSWriter(out=str(out), columns=columns, size_limit=CHUNK_BYTES) as writer:
        for i, image in enumerate(w.images):
            writer.write({"image": image, **{h: int(c[i]) for h, c in w.labels.items()}})
    return out
