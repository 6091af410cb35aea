"""The decode stage: each JPEG/PNG image of a batch decoded at the size training needs,
straight into its slot of the batch (:class:`~pipeline.loading.decode_spec.DecodeSpec`).

For each image: read the JPEG header (about 1 µs), place the crop in the original image,
decode at the largest DCT scale (1, 1/2, 1/4, 1/8) that still leaves at least ``size``
pixels across the crop (libjpeg-turbo through ``simplejpeg``), cut the crop out and resize
it with OpenCV (bilinear when the rest of the downscale is at most 2x, an integer area
pre-pass and bilinear beyond), into the slot. Baseline and progressive JPEGs in YCbCr,
RGB or grayscale take that path; CMYK/YCCK JPEGs, PNG, and anything ``simplejpeg`` refuses
(its warnings included) go through Pillow at full size with the same geometry. Bytes
neither reads raise :class:`ImageDecodeError`. See ``docs/loader.md``, "Decoding at
training size", and ``docs/design.md`` for why these two libraries.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from pipeline.loading.decode_spec import NDRAWS, DecodeSpec, Plan, plan

Layout = Literal["CHW", "HWC"]
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError)

cv2.setNumThreads(1)  # one image at a time per process: the dataloader workers are the parallelism


class ImageDecodeError(ValueError):
    """The bytes are not an image either decoder reads (or not of the size the spec needs)."""


class _Scratch(threading.local):
    """Per-thread reusable buffers (the decoder output and the resized image)."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, nbytes: int) -> np.ndarray:
        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(max(nbytes, 1 << 16), dtype=np.uint8)
            self.buffers[name] = buf
        return buf


_scratch = _Scratch()
_JPEG_MAGIC = b"\xff\xd8\xff"


def _check_out(out: np.ndarray, size: int, layout: Layout) -> None:
    if layout not in ("CHW", "HWC"):
        raise ValueError(f"layout: expected 'CHW' or 'HWC', found {layout!r}")
    shape = (3, size, size) if layout == "CHW" else (size, size, 3)
    if out.dtype != np.uint8 or out.shape != shape or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out: expected a writable C-contiguous uint8 array of shape {shape}, found "
                         f"{out.dtype} {out.shape} (contiguous={out.flags.c_contiguous})")


def decode_into(data: bytes | bytearray | memoryview, spec: DecodeSpec, u: np.ndarray, out: np.ndarray,
                layout: Layout = "CHW") -> Plan:
    """Decode one image as ``spec`` says into ``out``: uint8 ``(3, T, T)`` (``layout="CHW"``)
    or ``(T, T, 3)`` (``"HWC"``), ``T = spec.size``; e.g. one slot of a preallocated batch.
    ``u``: the image's row of uniforms. Returns the plan used (box in original pixels, DCT
    factor, flip). Raises :class:`ImageDecodeError` if the bytes do not decode."""
    _check_out(out, spec.size, layout)
    if len(u) < NDRAWS:
        raise ValueError(f"u: expected a row of {NDRAWS} uniforms, found {len(u)}")
    view = memoryview(data)
    if view.nbytes >= 3 and view[:3] == _JPEG_MAGIC:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(view)
        except ValueError as e:
            return _pillow_into(view, spec, u, out, layout, f"JPEG header: {e}")
        if colorspace in ("YCbCr", "RGB", "Gray"):
            p = _plan(height, width, spec, u)
            gray = colorspace == "Gray"
            try:
                if spec.crop == "full" and layout == "HWC" and not gray:  # straight into the slot
                    simplejpeg.decode_jpeg(view, colorspace="RGB", buffer=out)
                    if p.flip:
                        cv2.flip(out, 1, dst=out)
                    return p
                image = _decode_scaled(view, height, width, p.factor, gray)
            except ValueError as e:
                return _pillow_into(view, spec, u, out, layout, f"libjpeg-turbo: {e}")
            _resample_into(image, p, spec, out, layout)
            return p
    return _pillow_into(view, spec, u, out, layout, None)


def decode_full_into(data: bytes | bytearray | memoryview, out: np.ndarray) -> None:
    """A JPEG/PNG image at its own size into ``out``, uint8 ``(3, H, W)`` (grayscale made
    three channels): the stored-size path of fixed-size datasets. Raises
    :class:`ImageDecodeError` if the bytes do not decode or are not ``H`` x ``W``."""
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[0] != 3 or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a C-contiguous uint8 array (3, H, W), found {out.dtype} {out.shape}")
    height, width = out.shape[1:]
    view = memoryview(data)
    if view.nbytes >= 3 and view[:3] == _JPEG_MAGIC:
        try:
            found_h, found_w, colorspace, _ = simplejpeg.decode_jpeg_header(view)
            if colorspace in ("YCbCr", "RGB", "Gray") and (found_h, found_w) == (height, width):
                image = _decode_scaled(view, height, width, 1, colorspace == "Gray")
                _store(image if image.shape[2] == 3 else image[:, :, 0], out, "CHW")
                return
        except ValueError:
            pass  # Pillow says what is wrong
    image = _pillow_image(view, None)
    if image.shape[:2] != (height, width):
        raise ImageDecodeError(f"image expected CxHxW {(3, height, width)}, found "
                               f"{(image.shape[2], image.shape[0], image.shape[1])}")
    _store(image if image.shape[2] == 3 else image[:, :, 0], out, "CHW")


def _decode_scaled(view: memoryview, height: int, width: int, factor: int, gray: bool) -> np.ndarray:
    """The whole image at 1/factor, (h, w, 1 or 3), in a reused per-thread buffer."""
    h, w = -(-height // factor), -(-width // factor)
    channels = 1 if gray else 3
    buf = _scratch.get("decode", h * w * channels)
    image = simplejpeg.decode_jpeg(view, colorspace="GRAY" if gray else "RGB",
                                   min_height=h if factor > 1 else 0, min_width=w if factor > 1 else 0,
                                   buffer=buf)
    if image.shape[:2] != (h, w):  # cannot happen with power-of-two factors on sides >= 16
        raise ValueError(f"decoded {image.shape[:2]} at 1/{factor}, expected {(h, w)}")
    return image


def _pillow_into(view: memoryview, spec: DecodeSpec, u: np.ndarray, out: np.ndarray, layout: Layout,
                 why: str | None) -> Plan:
    """Fallback: Pillow decodes at full size (CMYK→RGB, palette, alpha dropped, 16-bit...)."""
    image = _pillow_image(view, why)
    height, width = image.shape[:2]
    p = _plan(height, width, spec, u)
    p = Plan(p.box, 1, p.flip)
    _resample_into(image, p, spec, out, layout)
    return p


def _pillow_image(view: memoryview, why: str | None) -> np.ndarray:
    """The image as Pillow decodes it, (h, w, 1) gray or (h, w, 3) RGB."""
    try:
        with Image.open(io.BytesIO(view)) as pil:
            pil.load()
            image = np.asarray(pil if pil.mode in ("RGB", "L") else pil.convert("RGB"))
    except _PILLOW_ERRORS as e:
        first = f"; before that {why}" if why else ""
        raise ImageDecodeError(f"image does not decode: Pillow: {type(e).__name__}: {e}{first}") from e
    return image[:, :, None] if image.ndim == 2 else image


def _scratch_image(name: str, size: int, channels: int) -> np.ndarray:
    n = size * size * channels
    buf = _scratch.get(name, n)[:n]
    return buf.reshape(size, size, channels) if channels > 1 else buf.reshape(size, size)


def _resample_into(image: np.ndarray, p: Plan, spec: DecodeSpec, out: np.ndarray, layout: Layout) -> None:
    """Cut ``p.box`` (scaled by 1/factor) out of ``image`` (h, w, 1|3) and resize it into ``out``."""
    size, f = spec.size, p.factor
    top, left, bh, bw = p.box
    dh, dw, channels = image.shape
    y0 = min(max(round(top / f), 0), dh - 1)
    x0 = min(max(round(left / f), 0), dw - 1)
    y1 = max(min(round((top + bh) / f), dh), y0 + 1)
    x1 = max(min(round((left + bw) / f), dw), x0 + 1)
    # OpenCV's INTER_AREA is fast only for integer factors (~10 µs) and slow otherwise (120-170
    # µs for 250x200 -> 112): an axis shrunk more than ``area_above`` times is first box-averaged
    # by the integer k = floor(factor) (its extent grown or trimmed to a multiple of k, at most
    # k - 1 pixels), which leaves less than 2x for INTER_LINEAR.
    ky = int((y1 - y0) / size) if (y1 - y0) / size > spec.area_above else 1
    kx = int((x1 - x0) / size) if (x1 - x0) / size > spec.area_above else 1
    if ky > 1:
        y0, y1 = _multiple(y0, y1, ky, dh)
    if kx > 1:
        x0, x1 = _multiple(x0, x1, kx, dw)
    crop = image[y0:y1, x0:x1] if channels == 3 else image[y0:y1, x0:x1, 0]
    if ky > 1 or kx > 1:
        ph, pw = (y1 - y0) // ky, (x1 - x0) // kx
        buf = _scratch.get("prepass", ph * pw * channels)[:ph * pw * channels]
        crop = cv2.resize(crop, (pw, ph), dst=buf.reshape((ph, pw, channels) if channels > 1 else (ph, pw)),
                          interpolation=cv2.INTER_AREA)
    ch, cw = crop.shape[:2]
    in_out = False  # the result already sits in ``out``
    if (ch, cw) == (size, size):
        result = crop
    else:
        down = max(ch / size, cw / size)
        interp = cv2.INTER_AREA if down > spec.area_above else cv2.INTER_LINEAR
        in_out = layout == "HWC" and channels == 3
        dst = out if in_out else _scratch_image("resized", size, channels)
        result = cv2.resize(crop, (size, size), dst=dst, interpolation=interp)
    if p.flip:
        if in_out:
            cv2.flip(out, 1, dst=out)
        else:
            result = cv2.flip(result, 1, dst=_scratch_image("flipped", size, channels))
    if not in_out:
        _store(result, out, layout)


def _multiple(a: int, b: int, k: int, n: int) -> tuple[int, int]:
    """[a, b) grown (within [0, n)), else trimmed, to a length that is a multiple of k."""
    extra = -(b - a) % k
    grow_hi = min(extra - extra // 2, n - b)  # split the growth between both ends
    grow_lo = min(extra - grow_hi, a)
    b, a = b + grow_hi, a - grow_lo
    extra -= grow_hi + grow_lo
    if extra:
        more = min(extra, n - b)
        b += more
        extra -= more
    if extra:
        b -= (b - a) % k
    return a, b


def _store(image: np.ndarray, out: np.ndarray, layout: Layout) -> None:
    """(T, T, 3) or gray (T, T) into a CHW or HWC slot."""
    if layout == "HWC":
        np.copyto(out, image if image.ndim == 3 else image[:, :, None])
    elif image.ndim == 2:
        for c in range(3):
            np.copyto(out[c], image)
    else:
        cv2.split(image, [out[0], out[1], out[2]])


def decode_batch(items: Sequence[bytes | memoryview], spec: DecodeSpec, uniforms: np.ndarray, out: np.ndarray,
                 layout: Layout = "CHW") -> list[tuple[int, str]]:
    """Every image of a batch into ``out`` (``(B, 3, T, T)`` or ``(B, T, T, 3)`` uint8, e.g. a
    shared-memory batch buffer), image ``j`` with ``uniforms[j]``. Returns ``(j, reason)``
    for images that did not decode (their slots are left as they were) so the caller can
    apply its error policy (replace them with other samples of the batch, or raise)."""
    if len(items) > len(out) or uniforms.shape[0] < len(items):
        raise ValueError(f"decode_batch: {len(items)} images, {len(out)} slots, {uniforms.shape[0]} rows of draws")
    bad = []
    for j, data in enumerate(items):
        try:
            decode_into(data, spec, uniforms[j], out[j], layout)
        except ImageDecodeError as e:
            bad.append((j, str(e)))
    return bad


def _plan(height: int, width: int, spec: DecodeSpec, u: np.ndarray) -> Plan:
    try:
        return plan(height, width, spec, u)
    except ValueError as e:
        raise ImageDecodeError(str(e)) from e
