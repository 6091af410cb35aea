"""``write_shards``: a user's own samples into a shard set, with the converters' guarantees."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import ConversionError, DatasetSchema, Head, ImageSpec, make_loader
from shard_tools import Sample, write_shards
from shard_tools.validate import validate

RAW = DatasetSchema(name="mine", split="train", image=ImageSpec(4, 6, 3),
                    heads=(Head(name="shape", kind="class", num_classes=5, class_names=tuple("abcde")),
                           Head.quantized("size", 0.0, 10.0, 0.5)))
JPG = DatasetSchema(name="photos", split="train", image=ImageSpec(None, None, 3, encoding="jpg", layout="HWC"),
                    heads=(Head(name="label", kind="class", num_classes=3),))


def raw_samples(n: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [Sample(rng.integers(0, 256, (3, 4, 6), dtype=np.uint8), {"shape": i % 5}, {"size": (i % 21) / 2})
            for i in range(n)]


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_raw_samples_round_trip(tmp_path: Path) -> None:
    samples = raw_samples(40)
    manifest = write_shards(samples, tmp_path / "out", RAW, max_samples=16)
    assert manifest.num_samples == 40 and len(manifest.shards) == 3
    assert validate(str(tmp_path / "out"), decode=True, progress=False).ok
    loader = make_loader(str(tmp_path / "out"), batch_size=40, num_workers=0, shuffle=False, with_keys=True)
    images, labels, keys = next(iter(loader))
    for image, shape, size, key in zip(images, labels["shape"], labels["size.value"], keys, strict=True):
        sample = samples[int(key)]
        assert np.array_equal(image.numpy(), sample.image)
        assert int(shape) == sample.labels["shape"]
        assert abs(float(size) - sample.values["size"]) <= 10 / 255 / 2 + 1e-6  # to the nearest of 256 levels


def test_stock_webdataset_reads_them(tmp_path: Path) -> None:
    write_shards(raw_samples(8), tmp_path / "out", RAW)
    found = list(wds.WebDataset(str(tmp_path / "out" / "train" / "train-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in found] == [f"{i:08d}" for i in range(8)]


def _jpeg(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_jpeg_bytes_and_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (8 + i, 10, 3), dtype=np.uint8) for i in range(6)]
    samples = [Sample(_jpeg(a) if i % 2 else a, {"label": i % 3}, key=f"photo-{i}") for i, a in enumerate(arrays)]
    write_shards(samples, tmp_path / "out", JPG)
    assert validate(str(tmp_path / "out"), decode=True, progress=False).ok
    from torchvision.transforms import v2
    loader = make_loader(str(tmp_path / "out"), batch_size=6, num_workers=0, shuffle=False, with_keys=True,
                         transform=v2.Resize((8, 8)))
    _, labels, keys = next(iter(loader))
    assert keys == [f"photo-{i}" for i in range(6)] and labels["label"].tolist() == [0, 1, 2, 0, 1, 2]


def test_a_quantized_head_takes_a_class_or_a_value(tmp_path: Path) -> None:
    head = RAW.head("size")
    image = np.zeros((3, 4, 6), np.uint8)
    samples = [Sample(image, {"shape": 0, "size": 7}), Sample(image, {"shape": 0}, {"size": 3.2})]
    write_shards(samples, tmp_path / "out", RAW)
    loader = make_loader(str(tmp_path / "out"), batch_size=2, num_workers=0, shuffle=False)
    _, labels = next(iter(loader))
    assert labels["size"].tolist() == [7, head.class_of_quantized(round(3.2 / 10 * 255))]
    assert abs(float(labels["size.value"][0]) - 3.5) < 0.03  # the byte nearest class 7's centre, 3.5


def test_the_same_samples_give_the_same_bytes(tmp_path: Path) -> None:
    write_shards(raw_samples(30), tmp_path / "a", RAW, max_samples=8)
    write_shards(raw_samples(30), tmp_path / "b", RAW, max_samples=8)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


def test_a_failure_publishes_nothing_and_keeps_the_earlier_output(tmp_path: Path) -> None:
    write_shards(raw_samples(10), tmp_path / "out", RAW)
    before = digests(tmp_path / "out")

    def failing():
        yield from raw_samples(20, seed=5)[:12]
        raise OSError("the user's reader failed")

    with pytest.raises(OSError, match="the user's reader failed"):
        write_shards(failing(), tmp_path / "out", RAW, max_samples=4)
    assert digests(tmp_path / "out") == before


def test_an_interrupted_write_resumes_to_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    import shard_tools.write

    monkeypatch.setattr(shard_tools.write, "BLOCK_SAMPLES", 4)  # blocks reach the writer before the interrupt
    write_shards(raw_samples(50), tmp_path / "clean", RAW, max_samples=8)
    produced = []

    def interrupted():
        for i, sample in enumerate(raw_samples(50)):
            if i == 30:
                raise KeyboardInterrupt
            yield sample

    with pytest.raises(KeyboardInterrupt):
        write_shards(interrupted(), tmp_path / "out", RAW, max_samples=8, resume="v1")
    staged = sorted(p.name for p in (tmp_path / "out" / "train" / ".staging").glob("*.tar"))
    assert staged == [f"train-00000{i}.tar" for i in range(3)]  # 24 samples in finished shards

    def counted():
        for sample in raw_samples(50):
            produced.append(1)
            yield sample

    write_shards(counted(), tmp_path / "out", RAW, max_samples=8, resume="v1")
    assert digests(tmp_path / "out") == digests(tmp_path / "clean") and len(produced) == 50


@pytest.mark.parametrize(("sample", "error"), [
    (Sample(np.zeros((4, 6, 3), np.uint8), {"shape": 0, "size": 0}), r"sample 0: image expected a uint8 array of "
                                                                     r"shape \(3, 4, 6\)"),
    (Sample(np.zeros((3, 4, 6), np.float32), {"shape": 0, "size": 0}), r"found float32"),
    (Sample(np.zeros((3, 4, 6), np.uint8), {"shape": 5, "size": 0}), r"head 'shape': expected a class in 0..4, "
                                                                     r"found 5"),
    (Sample(np.zeros((3, 4, 6), np.uint8), {"shape": True, "size": 0}), r"head 'shape': expected a class"),
    (Sample(np.zeros((3, 4, 6), np.uint8), {"shape": 0}), r"head 'size': expected a class in 0..20, found None"),
    (Sample(np.zeros((3, 4, 6), np.uint8), {"shape": 0, "size": 0, "colour": 1}), r"heads \['colour'\] are not in"),
    (Sample(np.zeros((3, 4, 6), np.uint8), {"shape": 0}, {"size": 11.0}), r"value expected in 0.0..10.0, found 11.0"),
    (Sample(np.zeros((3, 4, 6), np.uint8), {"shape": 0, "size": 1}, {"size": 9.0}), r"value 9.0 is class 18, not "
                                                                                   r"the class 1 given"),
    (Sample(np.zeros((3, 4, 6), np.uint8), {"shape": 0, "size": 0}, key="../x"), r"key '../x': expected"),
    ({"image": np.zeros((3, 4, 6), np.uint8), "label": {}}, r"expected a Sample or a mapping"),
])
def test_bad_samples_are_named(tmp_path: Path, sample: object, error: str) -> None:
    with pytest.raises(ConversionError, match=error):
        write_shards([sample], tmp_path / "out", RAW)  # type: ignore[list-item]
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()


@pytest.mark.parametrize(("image", "error"), [
    (b"\x89PNG\r\n\x1a\nnot really", r"image expected JPG bytes"),
    (b"\xff\xd8\xff\xe0 cut short", r"image does not open as JPG"),
    (np.zeros((4, 4), np.uint8), r"image expected a uint8 HxWx3 array"),
])
def test_bad_encoded_images_are_named(tmp_path: Path, image: object, error: str) -> None:
    with pytest.raises(ConversionError, match=error):
        write_shards([Sample(image, {"label": 0})], tmp_path / "out", JPG)  # type: ignore[arg-type]


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    image = np.zeros((3, 4, 6), np.uint8)
    with pytest.raises(ConversionError, match=r"sample 1 \(a\): key 'a' given twice"):
        write_shards([Sample(image, {"shape": 0, "size": 0}, key="a")] * 2, tmp_path / "out", RAW)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 20)), min_size=1, max_size=30),
       limit=st.integers(1, 12))
def test_labels_survive_any_shard_cuts(tmp_path_factory, rows: list[tuple[int, int]], limit: int) -> None:
    out = tmp_path_factory.mktemp("w")
    samples = [Sample(np.full((3, 4, 6), i % 256, np.uint8), {"shape": a, "size": b}) for i, (a, b) in enumerate(rows)]
    write_shards(samples, out, RAW, max_samples=limit)
    loader = make_loader(str(out), batch_size=len(rows), num_workers=0, shuffle=False)
    _, labels = next(iter(loader))
    assert list(zip(labels["shape"].tolist(), labels["size"].tolist(), strict=True)) == rows
