"""The decode stage (``pipeline.loading.decode_stage``): crop boxes equal to torchvision's for
the same draws, quality against the reference pipeline, fallback formats, corrupt images,
bad arguments, determinism."""

from __future__ import annotations

import io
import math
import pickle
import random

import numpy as np
import pytest
import simplejpeg
import torch
import torchvision.transforms.transforms as tv1
import torchvision.transforms.v2._geometry as tv2_geometry
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms import v2

from benchmarks import decode_quality as quality
from benchmarks import photos as synth
from pipeline.errors import ConfigError
from pipeline.loading import decode_stage
from pipeline.loading.decode_spec import (
    _FLIP,
    _LEFT,
    _TOP,
    NDRAWS,
    TRIES,
    DecodeSpec,
    center_box,
    crop_from_uniforms,
    dct_factor,
    draw_key,
    sample_uniforms,
)
from pipeline.loading.decode_stage import ImageDecodeError, decode_batch, decode_into

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def batch_uniforms(seed: int, epoch: int, start: int, count: int) -> np.ndarray:
    return sample_uniforms(draw_key(seed, epoch), start, count)


def one_row(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(NDRAWS)


# --- the crop box is torchvision's for the same draws --------------------------------------------------

class _ScriptedTorch:
    """Stands in for the ``torch`` module inside torchvision's RandomResizedCrop code: every
    ``torch.empty(1).uniform_(a, b)`` and ``torch.randint(lo, hi, (1,))`` returns the next
    value of a script made from the same uniforms ``crop_from_uniforms`` gets; everything else
    (``exp``, ``log``, ``tensor``...) is the real torch."""

    def __init__(self, spec: DecodeSpec, u: np.ndarray) -> None:
        self.spec, self.u, self.tries = spec, u, 0
        self.randints = iter((_TOP, _LEFT))

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def empty(self, *size: int) -> _ScriptedTorch._Uniform:
        assert size == (1,)
        return self._Uniform(self)

    class _Uniform:
        def __init__(self, owner: _ScriptedTorch) -> None:
            self.owner = owner

        def uniform_(self, lo: float | torch.Tensor, hi: float | torch.Tensor) -> torch.Tensor:
            o, t = self.owner, self.owner.tries
            o.tries += 1
            s0, s1 = o.spec.scale
            l0, l1 = o.spec.log_ratio
            if t % 2 == 0:  # area fraction: torchvision passes the scale bounds themselves
                assert (float(lo), float(hi)) == (s0, s1)
                return torch.tensor([s0 + o.u[t] * (s1 - s0)], dtype=torch.float64)
            # log ratio: torchvision passes float32 logs of the ratio bounds
            assert abs(float(lo) - l0) < 1e-6 and abs(float(hi) - l1) < 1e-6
            return torch.tensor([l0 + o.u[t] * (l1 - l0)], dtype=torch.float64)

    def randint(self, lo: int, hi: int, size: tuple[int, ...]) -> torch.Tensor:
        slot = next(self.randints)
        return torch.tensor([lo + int(self.u[slot] * (hi - lo))])


def _random_case(rng: np.random.Generator) -> tuple[int, int, DecodeSpec, np.ndarray]:
    height, width = (int(v) for v in rng.integers(1, 900, 2))
    if rng.random() < 0.3:  # very elongated images: the ratio check fails and the fallback runs
        width = max(1, height // int(rng.integers(3, 20)))
    lo = float(rng.uniform(0.01, 1.0))
    scale = (lo, float(rng.uniform(lo, 1.0))) if rng.random() < 0.5 else (0.08, 1.0)
    r0 = float(np.exp(rng.uniform(-1.5, 0.5)))
    ratio = (r0, r0 * float(np.exp(rng.uniform(0, 1.5)))) if rng.random() < 0.5 else (3 / 4, 4 / 3)
    u = rng.random(NDRAWS)
    if rng.random() < 0.2:  # push every try out of bounds: large areas at extreme ratios
        u[0:20:2] = rng.uniform(0.95, 1.0, 10)
        u[1:20:2] = rng.choice([0.0, 0.9999], 10)
    return height, width, DecodeSpec(224, scale=scale, ratio=ratio), u


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_crop_box_equals_torchvision_for_the_same_draws(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    fallbacks = 0
    for _ in range(4000):
        height, width, spec, u = _random_case(rng)
        fake = _ScriptedTorch(spec, u)
        if version == "v2":
            monkeypatch.setattr(tv2_geometry, "torch", fake)
            t = v2.RandomResizedCrop(224, scale=spec.scale, ratio=spec.ratio)
            p = t.make_params([torch.empty((3, height, width), dtype=torch.uint8)])
            theirs = (p["top"], p["left"], p["height"], p["width"])
        else:
            monkeypatch.setattr(tv1, "torch", fake)
            theirs = tv1.RandomResizedCrop.get_params(torch.empty((3, height, width)), list(spec.scale),
                                                      list(spec.ratio))
        monkeypatch.undo()
        ours = crop_from_uniforms(height, width, spec, u)
        assert tuple(int(v) for v in theirs) == ours, (height, width, spec, u.tolist())
        fallbacks += fake.tries == 2 * TRIES
    assert fallbacks > 100  # the central-crop fallback was exercised


def test_log_ratio_bounds_match_torchvision_to_float32_precision() -> None:
    for ratio in [(3 / 4, 4 / 3), (0.5, 2.0), (1.0, 1.0), (0.1, 7.3)]:
        ours = DecodeSpec(224, ratio=ratio).log_ratio
        theirs = torch.log(torch.tensor(ratio)).tolist()
        assert np.allclose(ours, theirs, rtol=0, atol=1e-6)


def test_no_global_rng_is_touched() -> None:
    np.random.seed(1)
    random.seed(1)
    torch.manual_seed(1)
    before = (np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state().clone())
    spec = DecodeSpec(64, flip=True)
    out = np.empty((3, 64, 64), np.uint8)
    data = synth.photo_jpeg(0, 0, 200, 300)
    decode_into(data, spec, one_row(3), out)
    decode_batch([data] * 3, spec, batch_uniforms(0, 0, 0, 3), np.empty((3, 3, 64, 64), np.uint8))
    assert np.array_equal(before[0], np.random.get_state()[1])
    assert before[1] == random.getstate()
    assert torch.equal(before[2], torch.get_rng_state())


# --- geometry of the other modes and of the DCT factor --------------------------------------------------

@pytest.mark.parametrize("height,width", [(256, 256), (160, 500), (500, 161), (333, 222), (224, 225)])
@pytest.mark.parametrize("size", [224, 112, 32])
def test_center_box_follows_resize_then_center_crop(height: int, width: int, size: int) -> None:
    resized = v2.functional.resize(torch.empty((3, height, width), dtype=torch.uint8), size, antialias=True)
    new_h, new_w = resized.shape[-2:]
    top, left, h, w = center_box(height, width, size)
    assert math.isclose(h, size * height / new_h) and math.isclose(w, size * width / new_w)
    assert math.isclose(top, round((new_h - size) / 2) * height / new_h)
    assert math.isclose(left, round((new_w - size) / 2) * width / new_w)


def test_dct_factor_is_the_largest_that_keeps_size_pixels() -> None:
    rng = np.random.default_rng(1)
    spec = DecodeSpec(64)
    for _ in range(2000):
        bh, bw = (float(v) for v in rng.uniform(1, 1200, 2))
        f = dct_factor(bh, bw, 1200, 1200, spec)
        assert f in (1, 2, 4, 8)
        assert f == 1 or min(bh, bw) / f >= 64
        assert f == 8 or min(bh, bw) / (2 * f) < 64
    assert dct_factor(500, 500, 12, 12, spec) == 1  # tiny images never scale
    assert dct_factor(500, 500, 900, 900, DecodeSpec(64, dct_scaling=False)) == 1


# --- quality against the reference pipeline --------------------------------------------------------------

@pytest.fixture(scope="module")
def photos() -> dict[str, list[bytes]]:
    return {"256": synth.photo_set("256", 24, seed=11), "varied": synth.photo_set("varied", 24, seed=11)}


@pytest.mark.parametrize("kind", ["256", "varied"])
@pytest.mark.parametrize("crop,size", [("random", 224), ("random", 112), ("random", 64), ("random", 32),
                                       ("resize", 32), ("center", 224), ("center", 64)])
def test_mean_psnr_vs_torchvision_antialias_at_least_30db(photos: dict[str, list[bytes]], kind: str, crop: str,
                                                          size: int) -> None:
    values, factors = quality.psnrs(photos[kind], DecodeSpec(size, crop=crop))  # type: ignore[arg-type]
    assert np.mean(values) >= 30.0, (np.mean(values), np.min(values))
    if size <= 64:
        assert max(factors) > 1  # the DCT scaling really ran


def test_scale_one_pixels_are_the_reference_decoder_s(photos: dict[str, list[bytes]]) -> None:
    """simplejpeg at scale 1 decodes bit-identically to torchvision.io.decode_jpeg (and Pillow)."""
    for data in photos["varied"][:8]:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        ours = decode_stage._decode_scaled(memoryview(data), h, w, 1, False)
        ref = torchvision_decode(data)
        assert np.array_equal(ours, ref)
        assert np.array_equal(ours, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def torchvision_decode(data: bytes) -> np.ndarray:
    from torchvision.io import decode_jpeg
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy()


# --- layouts, flip, full size ---------------------------------------------------------------------------

def test_hwc_and_chw_slots_hold_the_same_pixels(photos: dict[str, list[bytes]]) -> None:
    for crop, size in [("random", 112), ("resize", 32), ("center", 64)]:
        spec = DecodeSpec(size, crop=crop, flip=True)  # type: ignore[arg-type]
        u = batch_uniforms(3, 1, 0, 8)
        chw = np.empty((8, 3, size, size), np.uint8)
        hwc = np.empty((8, size, size, 3), np.uint8)
        decode_batch(photos["varied"][:8], spec, u, chw)
        decode_batch(photos["varied"][:8], spec, u, hwc, layout="HWC")
        assert np.array_equal(chw, hwc.transpose(0, 3, 1, 2))


def test_flip_mirrors_the_same_crop(photos: dict[str, list[bytes]]) -> None:
    spec = DecodeSpec(64, flip=True)
    u = np.random.default_rng(9).random(NDRAWS)
    plain, flipped = np.empty((3, 64, 64), np.uint8), np.empty((3, 64, 64), np.uint8)
    u[_FLIP] = 0.7
    assert not decode_into(photos["varied"][0], spec, u, plain).flip
    u[_FLIP] = 0.2
    assert decode_into(photos["varied"][0], spec, u, flipped).flip
    assert np.array_equal(flipped, plain[:, :, ::-1])


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_full_size_decodes_exact_pixels_into_the_slot(photos: dict[str, list[bytes]], layout: str) -> None:
    spec = DecodeSpec(256, crop="full")
    batch = np.zeros((4, 3, 256, 256) if layout == "CHW" else (4, 256, 256, 3), np.uint8)
    assert decode_batch(photos["256"][:4], spec, batch_uniforms(0, 0, 0, 4), batch, layout) == []  # type: ignore[arg-type]
    for j in range(4):
        ref = torchvision_decode(photos["256"][j])
        assert np.array_equal(batch[j] if layout == "HWC" else batch[j].transpose(1, 2, 0), ref)
    wrong = synth.photo_jpeg(0, 1, 200, 256)
    with pytest.raises(ImageDecodeError, match="256x256"):
        decode_into(wrong, spec, one_row(0), batch[0], layout)  # type: ignore[arg-type]


# --- special inputs: grayscale, CMYK, progressive, PNG -----------------------------------------------------

def _array() -> np.ndarray:
    return synth.photo_array(np.random.default_rng(5), 300, 420)


def _encoded(mode: str, fmt: str = "JPEG", **options: object) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(_array())
    (image.convert(mode) if mode != "RGB" else image).save(buf, fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("name,data,path", [
    ("gray jpeg", lambda: _encoded("L", quality=90), "simplejpeg"),
    ("cmyk jpeg", lambda: _encoded("CMYK", quality=90), "pillow"),
    ("progressive jpeg", lambda: _encoded("RGB", quality=90, progressive=True), "simplejpeg"),
    ("png rgb", lambda: _encoded("RGB", "PNG"), "pillow"),
    ("png rgba", lambda: _encoded("RGBA", "PNG"), "pillow"),
    ("png gray", lambda: _encoded("L", "PNG"), "pillow"),
    ("png palette", lambda: _encoded("P", "PNG"), "pillow"),
])
def test_special_inputs_give_three_channel_images(name: str, data, path: str, layout: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data = data()
    used = []
    real = decode_stage._pillow_into
    monkeypatch.setattr(decode_stage, "_pillow_into", lambda *a: used.append("pillow") or real(*a))
    for crop, size in [("random", 224), ("random", 64), ("resize", 32), ("center", 112)]:
        spec = DecodeSpec(size, crop=crop, flip=True)  # type: ignore[arg-type]
        out = np.zeros((3, size, size) if layout == "CHW" else (size, size, 3), np.uint8)
        p = decode_into(data, spec, one_row(1), out, layout)  # type: ignore[arg-type]
        chw = out if layout == "CHW" else out.transpose(2, 0, 1)
        assert chw.shape == (3, size, size)
        if "gray" in name:
            assert np.array_equal(chw[0], chw[1]) and np.array_equal(chw[1], chw[2])
        # the same geometry as a plain RGB decode by Pillow + the reference resize
        ref_image = torch.from_numpy(np.ascontiguousarray(
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)))
        if crop == "random":
            top, left, h, w = (int(v) for v in p.box)
            ref = v2.functional.resized_crop(ref_image, top, left, h, w, [size, size], antialias=True)
        elif crop == "center":
            ref = v2.functional.center_crop(v2.functional.resize(ref_image, size, antialias=True), [size, size])
        else:
            ref = v2.functional.resize(ref_image, [size, size], antialias=True)
        if p.flip:
            ref = ref.flip(-1)
        assert quality.psnr(chw, ref.numpy()) > 30, (name, crop, size)
    assert (("pillow" in used) == (path == "pillow")), used


@pytest.mark.parametrize("data", [
    b"", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0" + bytes(200), b"not an image at all",
    b"\x89PNG\r\n\x1a\n" + bytes(64),
])
def test_garbage_raises_a_clear_error(data: bytes) -> None:
    out = np.empty((3, 32, 32), np.uint8)
    with pytest.raises(ImageDecodeError, match="image does not decode"):
        decode_into(data, DecodeSpec(32), one_row(0), out)


def test_corrupt_jpeg_raises_and_batch_reports_it(photos: dict[str, list[bytes]]) -> None:
    good = photos["256"][0]
    truncated = good[: len(good) // 3]
    scrambled = bytearray(good)  # random bytes in the middle of the entropy-coded data
    scrambled[len(good) // 2:len(good) // 2 + 300] = bytes(np.random.default_rng(0).integers(0, 256, 300,
                                                                                              dtype=np.uint8))
    out = np.empty((3, 64, 64), np.uint8)
    with pytest.raises(ImageDecodeError) as e:
        decode_into(truncated, DecodeSpec(64), one_row(0), out)
    assert "truncated" in str(e.value) or "Premature end" in str(e.value)
    batch = np.zeros((3, 3, 64, 64), np.uint8)
    bad = decode_batch([good, truncated, good], DecodeSpec(64), batch_uniforms(0, 0, 0, 3), batch)
    assert [j for j, _ in bad] == [1]
    assert batch[0].any() and not batch[1].any()
    with pytest.raises(ImageDecodeError, match=r"libjpeg-turbo: .*marker"):
        decode_into(bytes(scrambled), DecodeSpec(64), one_row(0), out)


def test_bad_arguments() -> None:
    for kwargs in [{"size": 0}, {"size": 2.5}, {"size": True}, {"size": 32, "crop": "middle"},
                   {"size": 32, "scale": (0.5, 0.1)}, {"size": 32, "scale": (0, 1)}, {"size": 32, "scale": (0.1, 1.5)},
                   {"size": 32, "ratio": (2.0, 1.0)}, {"size": 32, "ratio": (0, 1)}, {"size": 32, "area_above": 0.5}]:
        with pytest.raises(ConfigError, match="DecodeSpec"):
            DecodeSpec(**kwargs)  # type: ignore[arg-type]
    spec = DecodeSpec(32)
    data = synth.photo_jpeg(0, 0, 64, 64)
    for out in [np.empty((3, 32, 33), np.uint8), np.empty((3, 32, 32), np.float32),
                np.empty((3, 64, 64), np.uint8)[:, ::2, ::2]]:
        with pytest.raises(ValueError, match="out"):
            decode_into(data, spec, one_row(0), out)
    with pytest.raises(ValueError, match="uniforms"):
        decode_into(data, spec, np.zeros(5), np.empty((3, 32, 32), np.uint8))


# --- determinism and resume ------------------------------------------------------------------------------

def test_decoding_is_deterministic_and_spec_pickles(photos: dict[str, list[bytes]]) -> None:
    spec = DecodeSpec(112, flip=True)
    spec2 = pickle.loads(pickle.dumps(spec))
    assert spec2 == spec and spec2.log_ratio == spec.log_ratio
    a = np.empty((24, 3, 112, 112), np.uint8)
    b = np.empty_like(a)
    decode_batch(photos["varied"], spec, batch_uniforms(7, 3, 1000, 24), a)
    decode_batch(photos["varied"], spec2, batch_uniforms(7, 3, 1000, 24), b)
    assert np.array_equal(a, b)
    decode_batch(photos["varied"], spec, batch_uniforms(7, 4, 1000, 24), b)  # next epoch
    assert not np.array_equal(a, b)


def test_batch_uniforms_depend_only_on_seed_epoch_and_sample_index() -> None:
    whole = batch_uniforms(5, 2, 0, 600)
    for cut in (1, 7, 256):
        parts = np.concatenate([batch_uniforms(5, 2, a, min(cut, 600 - a)) for a in range(0, 600, cut)])
        assert np.array_equal(parts, whole)  # any batch boundaries, any worker: same rows
    resumed = batch_uniforms(5, 2, 512, 88)  # resume after 2 batches of 256
    assert np.array_equal(resumed, whole[512:])
    assert not np.array_equal(batch_uniforms(5, 3, 0, 600), whole)
    assert not np.array_equal(batch_uniforms(6, 2, 0, 600), whole)
    assert (whole >= 0).all() and (whole < 1).all()


# --- any image size, any spec: a box inside the image, every slot written -----------------------------------

@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 700), width=st.integers(1, 700), size=st.sampled_from([1, 7, 32, 64, 224]),
       crop=st.sampled_from(["random", "center", "resize"]), flip=st.booleans(), seed=st.integers(0, 2**32 - 1),
       gray=st.booleans())
def test_any_image_size_and_spec_fills_the_slot_from_inside_the_image(height: int, width: int, size: int, crop: str,
                                                                     flip: bool, seed: int, gray: bool) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = synth.encode(pixels[:, :, 0] if gray else pixels, quality=80)
    spec = DecodeSpec(size, crop=crop, flip=flip)  # type: ignore[arg-type]
    out = np.full((3, size, size), 7, np.uint8)
    p = decode_into(data, spec, one_row(seed), out)
    top, left, h, w = p.box
    assert top >= 0 and left >= 0 and h > 0 and w > 0
    assert top + h <= height + 1e-6 and left + w <= width + 1e-6
    assert p.factor in (1, 2, 4, 8) and (p.factor == 1 or min(h, w) / p.factor >= size)
    reference = np.full_like(out, 8)  # the same bytes through a second, pre-filled slot
    decode_into(data, spec, one_row(seed), reference)
    assert np.array_equal(out, reference)  # 7s and 8s: every pixel written


# --- the stored-size path of fixed-size datasets ---------------------------------------------------------

def test_stored_size_decoding_gives_the_reference_pixels_in_chw(photos: dict[str, list[bytes]]) -> None:
    for data in photos["varied"][:4]:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        out = np.zeros((3, h, w), np.uint8)
        decode_stage.decode_full_into(data, out)
        assert np.array_equal(out, torchvision_decode(data).transpose(2, 0, 1))
    gray = _encoded("L", quality=90)
    out = np.zeros((3, 300, 420), np.uint8)
    decode_stage.decode_full_into(gray, out)
    assert np.array_equal(out[0], np.asarray(Image.open(io.BytesIO(gray)))) and np.array_equal(out[0], out[2])
    cmyk = _encoded("CMYK", quality=90)
    decode_stage.decode_full_into(cmyk, out)  # through Pillow
    assert np.array_equal(out.transpose(1, 2, 0), np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB")))
    with pytest.raises(ImageDecodeError, match=r"image expected CxHxW \(3, 300, 421\), found \(3, 300, 420\)"):
        decode_stage.decode_full_into(_encoded("RGB", quality=90), np.zeros((3, 300, 421), np.uint8))
    with pytest.raises(ImageDecodeError, match="image does not decode"):
        decode_stage.decode_full_into(b"\xff\xd8\xff\xe0" + bytes(50), out)
