"""Photo-like synthetic JPEGs of any size, for the decode-stage tests and the JPEG benchmarks.

A colour gradient, a soft wave, 3-6 flat shapes and sensor-like Gaussian noise (sigma 8),
saved by Pillow at quality 90 (4:2:0). Image ``i`` of a set depends only on ``(seed, i)``.
``"256"`` sets are 256x256 like the loader benchmark's; ``"varied"`` sets have sides of
160-500 px, like ImageNet's.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

QUALITY = 90


@lru_cache(maxsize=4)
def _noise(seed: int, side: int = 1024) -> np.ndarray:
    return np.random.default_rng([seed, 7]).normal(0, 8, (side, side, 3)).astype(np.int16)


def photo_array(rng: np.random.Generator, height: int, width: int, noise_seed: int = 0) -> np.ndarray:
    """One photo-like RGB image, uint8 (height, width, 3)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= max(height, width)
    x /= max(height, width)
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
    side = min(height, width)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = (int(v) for v in rng.integers(max(4, side // 12), max(8, side // 2), 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noise = _noise(noise_seed)
    oy, ox = int(rng.integers(0, noise.shape[0] - height + 1)), int(rng.integers(0, noise.shape[1] - width + 1))
    pixels = np.asarray(pil).astype(np.int16) + noise[oy:oy + height, ox:ox + width]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **options)
    return out.getvalue()


def photo_jpeg(seed: int, i: int, height: int, width: int, quality: int = QUALITY) -> bytes:
    """JPEG ``i`` of set ``seed`` (Pillow, 4:2:0 at quality 90)."""
    return encode(photo_array(np.random.default_rng([seed, i]), height, width, seed), quality=quality)


def sizes(kind: str, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``"256"``: n x (256, 256); ``"varied"``: sides drawn uniformly from 160..500."""
    if kind == "256":
        return [(256, 256)] * n
    rng = np.random.default_rng([seed, 99])
    return [(int(h), int(w)) for h, w in rng.integers(160, 501, (n, 2))]


def photo_set(kind: str, n: int, seed: int = 0) -> list[bytes]:
    return [photo_jpeg(seed, i, h, w) for i, (h, w) in enumerate(sizes(kind, n, seed))]


def photo_set_parallel(kind: str, n: int, seed: int = 0, processes: int = 2) -> list[bytes]:
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return pool.starmap(photo_jpeg, [(seed, i, h, w) for i, (h, w) in enumerate(sizes(kind, n, seed))],
                            chunksize=32)
