"""PSNR of the decode stage against the reference pipeline (for the tests and part 2b of the
benchmarks): ``torchvision.io.decode_jpeg`` then ``v2.functional.resized_crop`` / ``resize``
(+ ``center_crop``) with antialias, on the same boxes."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import decode_jpeg

from pipeline.loading.decode_spec import DecodeSpec, draw_key, sample_uniforms
from pipeline.loading.decode_stage import decode_into


def reference(data: bytes, spec: DecodeSpec, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """What torchvision makes of ``data`` (CHW uint8) with the same box."""
    img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    size = spec.size
    if spec.crop == "random" and box is not None:
        top, left, h, w = box
        out = F.resized_crop(img, top, left, h, w, size=[size, size], antialias=True)
    elif spec.crop == "center":
        out = F.center_crop(F.resize(img, size, antialias=True), [size, size])
    elif spec.crop == "resize":
        out = F.resize(img, [size, size], antialias=True)
    else:
        out = img
    return out.contiguous().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def psnrs(images: list[bytes], spec: DecodeSpec, seed: int = 0) -> tuple[list[float], list[int]]:
    """Per-image PSNR (capped at 99 dB; no flip) and the DCT factor each image used."""
    out = np.empty((3, spec.size, spec.size), np.uint8)
    u = sample_uniforms(draw_key(seed, 0), 0, len(images))
    values, factors = [], []
    for j, data in enumerate(images):
        p = decode_into(data, spec, u[j], out)
        box = tuple(int(v) for v in p.box) if spec.crop == "random" else None
        values.append(min(psnr(out, reference(data, spec, box)), 99.0))  # type: ignore[arg-type]
        factors.append(p.factor)
    return values, factors
