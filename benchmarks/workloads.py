"""The loader benchmark's two workloads, generated once per run, and each peer's copy of them.

1. ``raw32``: the synthetic VIMH source (32x32x3 planar raw pixels, two quantized heads),
   converted to our shards with ``convert``.
2. ``jpeg256``: synthetic photo-like 256x256 RGB JPEGs (``benchmarks.photos``: gradients,
   waves, shapes and noise, quality 90) with one 100-class label, written with our
   ``ShardWriter``; ``jpegvaried``: the same with sides of 160-500 px (ImageNet-like).

Every tool reads the same samples. The peers' formats (litdata, MosaicML MDS) are written
from the same bytes in the same order as our shards; their labels are the class indices our
loader yields (``labels[head]``), stored as plain ints.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.photos import photo_set_parallel
from pipeline.format.labels import encode_labels
from pipeline.format.schema import DatasetSchema, Head, ImageSpec
from pipeline.io.reading import read_manifest
from shard_tools.conversion.plan import sample_order
from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh
from shard_tools.writer import ShardWriter

JPEG_SIZE = 256
JPEG_CLASSES = 100
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

def jpeg_schema(kind: str = "256") -> DatasetSchema:
    side = JPEG_SIZE if kind == "256" else None
    return DatasetSchema(name=f"jpeg{kind}-bench", split="train",
                         image=ImageSpec(side, side, 3, encoding="jpg", layout="HWC"),
                         heads=(Head(name="label", kind="class", num_classes=JPEG_CLASSES),))


def make_jpeg(work: Path, n: int, kind: str = "256", seed: int = 0) -> Workload:
    """``n`` photo-like JPEGs (``benchmarks.photos``): ``kind="256"`` 256x256, ``"varied"``
    sides of 160-500 px (image ``i`` depends only on ``seed`` and ``i``; made on every core)."""
    images = photo_set_parallel(kind, n, seed=seed, processes=os.cpu_count() or 1)
    classes = np.random.default_rng([seed, n]).integers(0, JPEG_CLASSES, n).astype(np.int64)
    ours = write_jpeg_shards(work / f"jpeg{kind}-ours", kind, images, classes, -(-n // JPEG_SHARDS))
    title = f"{JPEG_SIZE}x{JPEG_SIZE} RGB JPEG" if kind == "256" else "RGB JPEG, sides 160-500 px"
    shape = (3, JPEG_SIZE, JPEG_SIZE) if kind == "256" else (3, 0, 0)
    return Workload(f"jpeg{kind}", f"{title}, 1 head", "jpg", shape, images, {"label": classes}, ours)


def write_jpeg_shards(out: Path, kind: str, images: list[bytes], classes: np.ndarray, max_samples: int,
                      times: int = 1) -> Path:
    """Our shards of ``images`` with their classes, ``times`` over (keys unique per copy);
    returns the shard root holding ``train/``."""
    with ShardWriter(out / "train", jpeg_schema(kind), max_samples=max_samples) as writer:
        for copy in range(times):
            for i, (jpeg, c) in enumerate(zip(images, classes.tolist(), strict=True)):
                key = f"{i:08d}" if times == 1 else f"{copy:02d}{i:08d}"
                writer.write(key, [("jpg", jpeg), ("labels.msgpack", encode_labels({"label": {"class": c}}))])
    return out


def repeated_jpeg(w: Workload, out: Path, times: int) -> Path:
    """Our shards of ``w``'s images ``times`` over: a long epoch of the same images."""
    return write_jpeg_shards(out, w.name.removeprefix("jpeg"), w.images, w.labels["label"], w.n, times)


def make_jpeg256(work: Path, n: int, seed: int = 0) -> Workload:
    return make_jpeg(work, n, "256", seed)


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
