"""Synthetic ImageNet-100 sources in the real layout (``SRC/train/<wnid>/*.JPEG``,
``SRC/val/<wnid>/*.JPEG``), with labels learnable from the pixels.

Images are RGB JPEGs of random sizes. Class ``c`` (the wnid's position in the class list,
at most 100 classes) is drawn as a bright red horizontal band in the ``c // 10``-th tenth
of the rows and a bright green vertical band in the ``c % 10``-th tenth of the columns,
over faint noise; :func:`read_class` decodes it. With ``bad_files`` the train split also
holds one grayscale JPEG, one CMYK JPEG and one PNG named ``.JPEG`` (the bad kinds
``docs/sources/imagenet100.md`` describes). Used by the tests and ``make shards
DATASET=imagenet100``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import ConversionError
from shard_tools.formats.imagenet100.class_lists import load_class_list

LIT, NOISE = 230, 40
BAD_FILES = (("gray", "L", "JPEG"), ("cmyk", "CMYK", "JPEG"), ("png", "RGB", "PNG"))


def draw_class(label: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An ``(height, width, 3)`` uint8 image drawing class ``label`` (0..99) as two bands."""
    image = rng.integers(0, NOISE, size=(height, width, 3), dtype=np.uint8)
    rows = np.arange(height) * 10 // height == label // 10
    cols = np.arange(width) * 10 // width == label % 10
    image[rows, :, 0] = LIT
    image[:, cols, 1] = LIT
    return image


def read_class(image: np.ndarray) -> int:
    """The class :func:`draw_class` drew into an ``(H, W, 3)`` image (survives JPEG)."""
    def brightest_tenth(profile: np.ndarray) -> int:
        tenth = np.arange(len(profile)) * 10 // len(profile)
        sums = np.bincount(tenth, weights=profile, minlength=10)
        return int(np.argmax(sums / np.maximum(np.bincount(tenth, minlength=10), 1)))

    return 10 * brightest_tenth(image[:, :, 0].mean(axis=1)) + brightest_tenth(image[:, :, 1].mean(axis=0))


def _encode(pixels: np.ndarray, mode: str, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    image = Image.fromarray(pixels, "RGB")
    image = image if mode == "RGB" else image.convert(mode)
    image.save(out, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return out.getvalue()


def generate_imagenet100(out: str | Path, *, n_train: int = 3, n_val: int = 1, class_list: str = "cmc",
                         min_size: int = 48, max_size: int = 96, bad_files: bool = False,
                         quality: int = 90, seed: int = 0) -> Path:
    """Write ``n_train`` and ``n_val`` JPEGs per class of ``class_list`` (a split with 0
    per class is not created); sides drawn from ``min_size..max_size``."""
    classes = load_class_list(class_list)
    if len(classes.wnids) > 100:
        raise ConversionError(f"{class_list}: expected at most 100 classes to draw, found {len(classes.wnids)}")
    if n_train < 0 or n_val < 0 or not 10 <= min_size <= max_size:
        raise ConversionError(f"expected n_train, n_val >= 0 and 10 <= min_size <= max_size, found "
                              f"{n_train}, {n_val}, {min_size}, {max_size}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    val_index = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for label, wnid in enumerate(classes.wnids if n else ()):
            folder = out / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                height, width = (int(x) for x in rng.integers(min_size, max_size + 1, size=2))
                pixels = draw_class(label, height, width, rng)
                val_index += split == "val"
                name = f"ILSVRC2012_val_{val_index:08d}.JPEG" if split == "val" else f"{wnid}_{i:04d}.JPEG"
                (folder / name).write_bytes(_encode(pixels, "RGB", "JPEG", quality))
    if bad_files and n_train:
        for label, (kind, mode, fmt) in enumerate(BAD_FILES):
            wnid = classes.wnids[label % len(classes.wnids)]
            pixels = draw_class(label, min_size, max_size, rng)
            (out / "train" / wnid / f"{wnid}_{kind}.JPEG").write_bytes(_encode(pixels, mode, fmt, quality))
    return out
