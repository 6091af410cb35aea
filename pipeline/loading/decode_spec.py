"""What the decode stage makes of each JPEG/PNG image: :class:`DecodeSpec` (public as
``pipeline.DecodeSpec``), and the geometry: where the crop lies in the original image
(torchvision's ``RandomResizedCrop`` algorithm, ``Resize`` + ``CenterCrop``, or a plain
resize), and how far the decoder may scale down in the DCT.

Randomness comes only from explicit uniforms in [0, 1): ``NDRAWS`` per image, counter-based
(:func:`sample_uniforms`): sample ``n`` of a rank's epoch always gets the same row, whatever
the batch cut or the worker, so a resumed epoch crops as the first run did. Nothing here
touches numpy's, Python's or torch's global generators.

Draws per image (``NDRAWS`` = 24): ``u[2t]`` is try ``t``'s area fraction and ``u[2t+1]``
its log aspect ratio (t = 0..9), ``u[20]`` the top and ``u[21]`` the left of the accepted
box, ``u[22]`` the horizontal flip (when below 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeAlias

import numpy as np

from pipeline.errors import ConfigError

NDRAWS = 24  # uniforms per image (whole Philox4x64 blocks: 4 doubles each)
TRIES = 10  # torchvision's RandomResizedCrop tries before its central-crop fallback
_TOP, _LEFT, _FLIP = 2 * TRIES, 2 * TRIES + 1, 2 * TRIES + 2
_MIN_DCT_SIDE = 16  # below this, never scale in the DCT
_KEY_TAG = 0x6A70656731365F31  # keeps these draws apart from any other use of (seed, epoch)

CropMode = Literal["random", "center", "resize", "full"]
Box: TypeAlias = tuple[int, int, int, int]  # top, left, height, width in original pixels
FBox: TypeAlias = tuple[float, float, float, float]


@dataclass(frozen=True)
class DecodeSpec:
    """What each JPEG/PNG image becomes in the batch: a ``size`` x ``size`` uint8 RGB image.

    - ``crop="random"``: torchvision ``RandomResizedCrop(size, scale, ratio)`` geometry (training);
    - ``crop="center"``: ``Resize(size)`` (shorter side to ``size``) then ``CenterCrop(size)`` (evaluation);
    - ``crop="resize"``: ``Resize((size, size))``, aspect ratio not kept;
    - ``crop="full"``: no resampling; every image must already be ``size`` x ``size``.

    ``flip``: a random horizontal flip, with probability 1/2. ``dct_scaling=False`` always
    decodes at full size (for quality comparisons). ``area_above``: the downscale factor
    above which OpenCV's area filter is used instead of bilinear."""

    size: int
    crop: CropMode = "random"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    dct_scaling: bool = True
    area_above: float = 2.0
    log_ratio: tuple[float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int | np.integer) or not 1 <= self.size <= 8192:
            raise ConfigError(f"DecodeSpec.size: expected an int in 1..8192, found {self.size!r}")
        object.__setattr__(self, "size", int(self.size))
        if self.crop not in ("random", "center", "resize", "full"):
            raise ConfigError(f"DecodeSpec.crop: expected 'random', 'center', 'resize' or 'full', found {self.crop!r}")
        scale = tuple(float(v) for v in self.scale)
        ratio = tuple(float(v) for v in self.ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"DecodeSpec.scale: expected (min, max) with 0 < min <= max <= 1, found {self.scale!r}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1] or not all(map(math.isfinite, ratio)):
            raise ConfigError(f"DecodeSpec.ratio: expected (min, max) with 0 < min <= max, found {self.ratio!r}")
        if not self.area_above >= 1:
            raise ConfigError(f"DecodeSpec.area_above: expected >= 1, found {self.area_above!r}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "log_ratio", (math.log(ratio[0]), math.log(ratio[1])))

    @classmethod
    def of(cls, value: DecodeSpec | Mapping[str, Any] | None, where: str = "decode") -> DecodeSpec | None:
        """``value`` as a spec: a spec as it is, a mapping (from YAML: ``{size: 112, crop:
        center}``) as its fields, None as None."""
        if value is None or isinstance(value, DecodeSpec):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a pipeline.DecodeSpec or a mapping of its fields, "
                              f"found {type(value).__name__}")
        return cls.from_fields(value, where)

    @classmethod
    def from_fields(cls, value: Mapping[str, Any], where: str = "decode") -> DecodeSpec:
        """A spec from a mapping of its fields, unknown or missing ones named."""
        unknown = sorted(set(value) - {f.name for f in fields(cls) if f.init})
        if unknown:
            raise ConfigError(f"{where}: unknown DecodeSpec field(s) {unknown}; expected size, crop, scale, ratio, "
                              "flip, dct_scaling, area_above")
        if "size" not in value:
            raise ConfigError(f"{where}: expected a size (pixels a side), found {dict(value)}")
        return cls(**value)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (C, H, W) every image comes out as."""
        return (3, self.size, self.size)

    @property
    def needs_draws(self) -> bool:
        return self.crop == "random" or self.flip


def draw_key(seed: int, epoch: int) -> np.ndarray:
    """The 128-bit Philox key of one (seed, epoch) (hashed once per epoch: ~10 µs)."""
    return np.random.SeedSequence([int(seed), int(epoch), _KEY_TAG]).generate_state(2, dtype=np.uint64)


def sample_uniforms(key: np.ndarray, start: int, count: int) -> np.ndarray:
    """Uniforms ``(count, NDRAWS)`` for samples ``start .. start + count - 1`` (counter-based:
    row ``n`` is Philox4x64 blocks ``n*6 .. n*6+5`` under ``key``, whatever else is drawn)."""
    counter = np.array([start * (NDRAWS // 4), 0, 0, 0], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter)).random((count, NDRAWS))


def crop_from_uniforms(height: int, width: int, spec: DecodeSpec, u: np.ndarray | Sequence[float]) -> Box:
    """torchvision ``RandomResizedCrop`` box ``(top, left, h, w)`` from explicit uniforms.

    Same steps as ``torchvision.transforms.v2.RandomResizedCrop.make_params`` (and v1
    ``get_params``): up to 10 tries of ``area * U(scale)`` and ``exp(U(log ratio))``, sides
    rounded with ``round``, accepted if ``0 < w <= width and 0 < h <= height``, then the
    top/left ``randint(0, n)`` as ``floor(u * n)``; else the central crop clamped to the
    ratio range. ``U(a, b)`` is ``a + u * (b - a)`` in float64 (torch draws in float32)."""
    area = height * width
    s0, s1 = spec.scale
    l0, l1 = spec.log_ratio
    for t in range(TRIES):
        target_area = area * (s0 + u[2 * t] * (s1 - s0))
        aspect = math.exp(l0 + u[2 * t + 1] * (l1 - l0))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u[_TOP] * (height - h + 1)), int(u[_LEFT] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, round(width / spec.ratio[0])
    elif in_ratio > spec.ratio[1]:
        h, w = height, round(height * spec.ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def center_box(height: int, width: int, size: int) -> FBox:
    """torchvision ``Resize(size)`` + ``CenterCrop(size)`` as a (fractional) box in the
    original image: the shorter side becomes ``size``, the longer ``int(size * long / short)``,
    and the crop starts at ``int(round((resized - size) / 2))``."""
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    sy, sx = height / new_h, width / new_w
    return top * sy, left * sx, size * sy, size * sx


@dataclass(frozen=True)
class Plan:
    """How one image is decoded: the box (original pixels), the DCT reduction (1, 2, 4, 8)
    and whether to flip."""

    box: FBox
    factor: int
    flip: bool


def dct_factor(box_h: float, box_w: float, height: int, width: int, spec: DecodeSpec) -> int:
    """Largest f in (1, 2, 4, 8) with at least ``spec.size`` decoded pixels across the box."""
    if not spec.dct_scaling or min(height, width) < _MIN_DCT_SIDE:
        return 1
    room = min(box_h, box_w) / spec.size
    f = 1
    while f < 8 and room >= 2 * f:
        f *= 2
    return f


def plan(height: int, width: int, spec: DecodeSpec, u: np.ndarray) -> Plan:
    """The box, DCT factor and flip for one image from its row of uniforms (read only for a
    random crop or a flip); a ValueError when ``crop="full"`` meets an image of another size."""
    if spec.crop == "random":
        box: FBox = crop_from_uniforms(height, width, spec, u)
    elif spec.crop == "center":
        box = center_box(height, width, spec.size)
    elif spec.crop == "resize" or (height, width) == (spec.size, spec.size):
        box = (0.0, 0.0, float(height), float(width))
    else:
        raise ValueError(f"crop='full': expected a {spec.size}x{spec.size} image, found {height}x{width}")
    factor = 1 if spec.crop == "full" else dct_factor(box[2], box[3], height, width, spec)
    return Plan(box, factor, bool(spec.flip and u[_FLIP] < 0.5))


