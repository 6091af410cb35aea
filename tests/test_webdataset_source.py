"""``shards convert webdataset``: shards that ``webdataset.ShardWriter`` wrote, converted with
no other preparation."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline import ConversionError, make_loader
from shard_tools.cli import main
from shard_tools.convert import convert
from shard_tools.validate import validate

HEADS = ["fine=cls:10", "coarse=json.coarse:3"]


def jpeg(array: np.ndarray, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_wds(directory: Path, n: int, *, start: int = 0, edit=None) -> Path:
    """``n`` samples as webdataset.ShardWriter writes them: ``jpg``, ``cls`` and ``json`` members."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    with wds.ShardWriter(str(directory / "part-%06d.tar"), maxcount=7, verbose=0) as sink:
        for i in range(start, start + n):
            sample = {"__key__": f"images/sample{i:05d}", "jpg": jpeg(rng.integers(0, 256, (12, 9 + i % 5, 3),
                                                                                      dtype=np.uint8)),
                      "cls": i % 10, "json": {"coarse": i % 3, "note": "x"}}
            sink.write(edit(i, sample) if edit else sample)
    return directory


def labels_of(out: Path, split: str = "train") -> list[tuple[int, int]]:
    from torchvision.transforms import v2

    loader = make_loader(str(out), split=split, batch_size=1000, num_workers=0, shuffle=False,
                         transform=v2.Resize((8, 8)))
    _, labels = next(iter(loader))
    return list(zip(labels["fine"].tolist(), labels["coarse"].tolist(), strict=True))


def test_shardwriter_output_converts_as_it_is(tmp_path: Path, capsys) -> None:
    src = write_wds(tmp_path / "wds", 30)
    out = tmp_path / "out"
    assert main(["convert", "webdataset", str(src), str(out), *[a for h in HEADS for a in ("--head", h)],
                 "--no-shuffle"]) == 0
    assert "train: 30 samples" in capsys.readouterr().out
    assert validate(str(out), decode=True, progress=False).ok
    assert labels_of(out) == [(i % 10, i % 3) for i in range(30)]


def test_split_directories_become_splits(tmp_path: Path) -> None:
    write_wds(tmp_path / "wds" / "train", 20)
    write_wds(tmp_path / "wds" / "val", 6, start=100)
    manifests = convert("webdataset", tmp_path / "wds", tmp_path / "out", options={"heads": HEADS}, shuffle=False)
    assert {s: m.num_samples for s, m in manifests.items()} == {"train": 20, "val": 6}
    assert labels_of(tmp_path / "out", "val") == [(i % 10, i % 3) for i in range(100, 106)]


def test_a_sample_without_a_field_is_an_error_or_skipped(tmp_path: Path, caplog) -> None:
    def drop_json(i: int, sample: dict) -> dict:
        return {k: v for k, v in sample.items() if k != "json"} if i == 4 else sample

    src = write_wds(tmp_path / "wds", 12, edit=drop_json)
    with pytest.raises(ConversionError, match=r"part-000000.tar: sample 'images/sample00004': no 'json.coarse' for "
                                              r"head 'coarse'.*on_bad=skip"):
        convert("webdataset", src, tmp_path / "out", options={"heads": HEADS})
    with caplog.at_level(logging.WARNING):
        manifests = convert("webdataset", src, tmp_path / "out", options={"heads": HEADS, "on_bad": "skip"},
                            shuffle=False)
    assert manifests["train"].num_samples == 11 and "sample00004" in caplog.text
    assert labels_of(tmp_path / "out") == [(i % 10, i % 3) for i in range(12) if i != 4]


@pytest.mark.parametrize(("edit", "error"), [
    (lambda i, s: {**s, "cls": 10}, r"class expected in 0..9, found 10"),
    (lambda i, s: {**s, "cls": "x"}, r"invalid literal for int"),
    (lambda i, s: {k: v for k, v in s.items() if k != "jpg"}, r"no image member"),
])
def test_bad_samples_are_named(tmp_path: Path, edit, error: str) -> None:
    src = write_wds(tmp_path / "wds", 3, edit=lambda i, s: edit(i, s) if i == 1 else s)
    with pytest.raises(ConversionError, match=rf"sample 'images/sample00001': .*{error}"):
        convert("webdataset", src, tmp_path / "out", options={"heads": HEADS})


def test_grayscale_and_png_images_are_re_encoded(tmp_path: Path) -> None:
    def odd_images(i: int, sample: dict) -> dict:
        pixels = np.full((10, 10, 3), 40 * i, np.uint8)
        if i == 1:
            return {**sample, "jpg": jpeg(pixels, "L")}
        if i == 2:
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="PNG")
            return {k: v for k, v in sample.items() if k != "jpg"} | {"png": out.getvalue()}
        return sample

    src = write_wds(tmp_path / "wds", 4, edit=odd_images)
    convert("webdataset", src, tmp_path / "out", options={"heads": HEADS})
    assert validate(str(tmp_path / "out"), decode=True, progress=False).ok


@pytest.mark.parametrize(("options", "error"), [
    ({"heads": ["fine"]}, r"--head: expected NAME=FIELD:CLASSES"),
    ({"heads": []}, r"at least one --head"),
    ({"heads": ["a=cls:3", "a=json.b:2"]}, r"head names must differ"),
    ({"heads": HEADS, "on_bad": "convert"}, r"on_bad: expected error \| skip"),
    ({"heads": HEADS, "colour": 1}, r"unknown option\(s\) \['colour'\]"),
])
def test_bad_options(tmp_path: Path, options: dict, error: str) -> None:
    src = write_wds(tmp_path / "wds", 2)
    with pytest.raises(ConversionError, match=error):
        convert("webdataset", src, tmp_path / "out", options=options)


def test_a_broken_tar_is_named(tmp_path: Path) -> None:
    src = write_wds(tmp_path / "wds", 8)
    broken = src / "part-000001.tar"
    broken.write_bytes(broken.read_bytes()[:700])
    with pytest.raises(ConversionError, match=r"part-000001.tar: not a readable tar"):
        convert("webdataset", src, tmp_path / "out", options={"heads": HEADS})


def test_json_labels_must_be_integers(tmp_path: Path) -> None:
    src = write_wds(tmp_path / "wds", 2, edit=lambda i, s: {**s, "json": json.dumps({"coarse": 1.5})})
    with pytest.raises(ConversionError, match=r"class expected in 0..2, found 1.5"):
        convert("webdataset", src, tmp_path / "out", options={"heads": HEADS})


def test_non_rgb_pngs_in_a_png_split_are_re_encoded_as_rgb(tmp_path: Path) -> None:
    """A PNG split keeps RGB PNGs byte for byte and re-encodes grayscale, RGBA and palette
    PNGs as RGB PNGs, the same bytes on every run, so the shards hold what the schema says."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    modes = ["RGB", "L", "RGBA", "P"]
    pngs = []
    for mode in modes:
        out = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(out, format="PNG")
        pngs.append(out.getvalue())
    src = tmp_path / "wds"
    src.mkdir()
    with wds.ShardWriter(str(src / "part-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i, png in enumerate(pngs):
            sink.write({"__key__": f"s{i}", "png": png, "cls": i})
    for run in ("out", "again"):
        convert("webdataset", src, tmp_path / run, shuffle=False, options={"heads": ["c=cls:4"]})
    report = validate(str(tmp_path / "out"), decode=True, progress=False)
    assert report.ok, [str(p) for p in report.problems]
    shard = tmp_path / "out" / "train" / "train-000000.tar"
    assert shard.read_bytes() == (tmp_path / "again" / "train" / "train-000000.tar").read_bytes()
    with tarfile.open(shard) as tar:
        stored = [tar.extractfile(m).read() for m in tar if m.name.endswith(".png")]  # type: ignore[union-attr]
    assert stored[0] == pngs[0]
    for data, mode in zip(stored, modes, strict=True):
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.mode) == ("PNG", "RGB"), mode
            assert np.array_equal(np.asarray(image), np.asarray(Image.fromarray(pixels).convert(mode).convert("RGB")))
