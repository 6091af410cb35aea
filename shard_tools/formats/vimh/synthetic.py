"""Synthetic VIMH sources in the real on-disk format, with labels learnable from pixels.

Each head owns a horizontal band of the image; the band is lit from the left edge to a
column proportional to the head's quantized value, over faint noise. Used by
``make demo``, the tests and the benchmarks.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConversionError


@dataclass(frozen=True)
class SynthParam:
    name: str
    min: float
    max: float
    step: float | None


DEFAULT_PARAMS = (
    SynthParam("note_number", 40.0, 88.0, 4.0),
    SynthParam("note_velocity", 0.0, 127.0, 16.0),
    SynthParam("decay_time", 0.1, 2.0, 0.2),
    SynthParam("pedal_angle", 0.0, 90.0, 10.0),
)


def synth_images(values: np.ndarray, height: int, width: int, channels: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Planar CHW uint8 images (n, C*H*W) drawing each head's value as a lit band."""
    n, n_heads = values.shape
    images = rng.integers(0, 40, size=(n, channels, height, width), dtype=np.uint8)
    band = max(1, height // max(n_heads, 1))
    columns = np.arange(width)[None, :]
    for j in range(n_heads):
        lit = columns < (values[:, j:j + 1].astype(np.int32) * width + 127) // 255  # (n, W)
        shade = (120 + 40 * (j % 3) + 60 * np.arange(channels) // max(channels, 1)).astype(np.uint8)
        rows = slice(j * band, min(height, (j + 1) * band))
        for c in range(channels):
            img = images[:, c, rows, :]
            img[np.broadcast_to(lit[:, None, :], img.shape)] = shade[c]
    return images.reshape(n, -1)


def _label_lists(values: np.ndarray) -> list[list[int]]:
    n_heads = values.shape[1]
    return [[n_heads, *(int(x) for pair in zip(range(n_heads), row, strict=True) for x in pair)]
            for row in values]


def _binary(values: np.ndarray, images: np.ndarray, scales: np.ndarray,
            dims: tuple[int, int, int], with_scales: bool) -> bytes:
    head = struct.pack("<HHH", *dims)
    records = []
    for row, image, scale in zip(values, images, scales, strict=True):
        labels = bytes([len(row), *(x for pair in enumerate(row) for x in pair)])
        scale_bytes = struct.pack("<ff", *scale) if with_scales else b""
        records.append(head + scale_bytes + labels + image.tobytes())
    return b"".join(records)


def _metadata(params: Sequence[SynthParam], dims: tuple[int, int, int], counts: dict[str, int],
              version: str, name: str) -> dict[str, object]:
    h, w, c = dims
    count_key = "num_{}_samples" if version.startswith("3") else "{}_samples"
    meta: dict[str, object] = {
        "format": "VIMH", "version": version, "dataset_name": name,
        "height": h, "width": w, "channels": c, "image_size": f"{h}x{w}x{c}",
        "varying_parameters": len(params), "parameter_names": [p.name for p in params],
        "parameter_mappings": {p.name: {"min": p.min, "max": p.max,
                                        **({"step": p.step} if p.step else {}),
                                        "scale": "linear", "description": f"synthetic {p.name}"}
                               for p in params},
        "fixed_parameters": {"sample_rate": {"value": 8000, "description": "Hz"}},
        "label_encoding": {"format": "[height] [width] [channels] [spec_min] [spec_max] [N] "
                                     "[param1_id] [param1_val] ...",
                           "metadata_bytes": 14 if version != "1.0" else 6},
    }
    meta.update({count_key.format(s): n for s, n in counts.items()})
    return meta


def generate_vimh(out: str | Path, *, n_train: int = 512, n_test: int = 128,
                  height: int = 32, width: int = 32, channels: int = 3, n_heads: int = 2,
                  variant: str = "pickle", version: str = "2.1", seed: int = 0,
                  params: Sequence[SynthParam] | None = None) -> Path:
    """Write a synthetic VIMH dataset; ``variant`` is pickle, binary, binary-v1 or both."""
    if variant not in ("pickle", "binary", "binary-v1", "both"):
        raise ConversionError(f"variant: expected pickle, binary, binary-v1 or both, found {variant!r}")
    chosen = tuple(params) if params is not None else DEFAULT_PARAMS[:n_heads]
    if params is None and not 1 <= n_heads <= len(DEFAULT_PARAMS):
        raise ConversionError(f"n_heads: expected 1..{len(DEFAULT_PARAMS)}, found {n_heads}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dims = (height, width, channels)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        values = rng.integers(0, 256, size=(n, len(chosen)), dtype=np.uint8)
        images = synth_images(values, height, width, channels, rng)
        scales = rng.uniform(-80, 0, size=(n, 2)).astype(np.float32)
        if variant in ("pickle", "both"):
            batch = {"data": images, "vimh_labels": _label_lists(values), "scale_factors": scales,
                     "height": height, "width": width, "channels": channels,
                     "image_size": height * width * channels}
            (out / f"{split}_batch").write_bytes(pickle.dumps(batch, protocol=4))
        if variant in ("binary", "binary-v1", "both"):
            data = _binary(values, images, scales, dims, with_scales=variant != "binary-v1")
            (out / split).write_bytes(data)
    meta = _metadata(chosen, dims, {"train": n_train, "test": n_test},
                     "1.0" if variant == "binary-v1" else version, out.name)
    (out / "vimh_dataset_info.json").write_text(json.dumps(meta, indent=2))
    return out
