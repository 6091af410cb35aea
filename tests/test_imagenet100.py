"""ImageNet-100 converter: JPEGs byte-identical in pass-through, labels = class list position,
the three class lists, resize, missing classes, each bad file kind under each on_bad, and the
fast header check against Pillow's."""

from __future__ import annotations

import builtins
import contextlib
import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.errors import ConversionError
from pipeline.format.labels import decode_labels
from pipeline.io.reading import iter_shard
from shard_tools.cli import main
from shard_tools.convert import convert
from shard_tools.formats.imagenet100.class_lists import builtin_class_list
from shard_tools.formats.imagenet100.reader import (
    NOT_RGB,
    OK,
    Probe,
    configure,
    probe,
    probe_bytes,
)
from shard_tools.formats.imagenet100.synthetic import generate_imagenet100, read_class
from shard_tools.formats.jpeg_header import jpeg_header
from shard_tools.validate import validate
from tests.conftest import no_output
from tests.test_make import needs_make, run_make

WNIDS = ("n01440764", "n01443537", "n01484850")
Samples = dict[str, dict[int, tuple[bytes, int]]]


def make_source(tmp_path: Path, lines: str = "\n".join(WNIDS), **kwargs: object) -> tuple[Path, Path]:
    """A 3-class source (2 train + 1 val JPEGs per class) and its class list file."""
    class_file = tmp_path / "classes.txt"
    class_file.write_text(lines + "\n")
    kwargs.setdefault("n_train", 2)
    src = generate_imagenet100(tmp_path / "imagenet100", class_list=str(class_file), **kwargs)  # type: ignore[arg-type]
    return src, class_file


def source_files(src: Path, split: str, wnids: tuple[str, ...]) -> list[tuple[Path, int]]:
    """Test oracle: the listed files in sample order (list position, then file name)."""
    return [(f, label) for label, w in enumerate(wnids) for f in sorted((src / split / w).glob("*.JPEG"))]


def read_shards(out: Path) -> Samples:
    """split -> index -> (image bytes, label), read back member by member."""
    samples: Samples = {}
    for shard in sorted(out.glob("*/*.tar")):
        for key, members in iter_shard(str(shard)):
            record = decode_labels(members["labels.msgpack"])
            assert record == msgpack.unpackb(members["labels.msgpack"])
            assert set(members) == {"jpg", "labels.msgpack"}
            samples.setdefault(shard.parent.name, {})[int(key)] = (members["jpg"], record["label"]["class"])
    return samples


def test_passthrough_roundtrip_is_byte_exact(tmp_path: Path) -> None:
    src, class_file = make_source(tmp_path)
    out = tmp_path / "out"
    manifests = convert("imagenet100", src, out, max_samples=4, options={"class_list": str(class_file)})
    assert sorted(manifests) == ["train", "val"]
    samples = read_shards(out)
    for split, manifest in manifests.items():
        schema = manifest.schema
        assert schema.image.describe() == "(varying)x3 jpg HWC"
        assert [(h.name, h.kind, h.num_classes, h.class_names) for h in schema.heads] == [
            ("label", "class", 3, WNIDS)]
        assert (schema.provenance.source_format, schema.provenance.source_version) == ("imagenet-folder",
                                                                                       "file:classes.txt")
        expected = source_files(src, split, WNIDS)
        assert len(samples[split]) == manifest.num_samples == len(expected)
        for index, (path, label) in enumerate(expected):
            assert samples[split][index] == (path.read_bytes(), label)
    report = validate(str(out), decode=False, progress=False)
    assert report.ok, [str(p) for p in report.problems]
    assert report.splits == {"train": 6, "val": 3}


@pytest.mark.parametrize("name", ["cmc", "hjepa"])
def test_builtin_lists_one_image_per_class(tmp_path: Path, name: str) -> None:
    """The full lists (100 classes, shipped in the package); no val/ → only train."""
    wnids = builtin_class_list(name).wnids
    assert len(wnids) == len(set(wnids)) == 100
    src = generate_imagenet100(tmp_path / "src", n_train=1, n_val=0, class_list=name)
    options = {} if name == "cmc" else {"class_list": name}
    manifests = convert("imagenet100", src, tmp_path / "out", options=options)
    assert list(manifests) == ["train"]
    schema = manifests["train"].schema
    assert schema.heads[0].class_names == wnids and schema.provenance.source_version == name
    for index, (image, label) in read_shards(tmp_path / "out")["train"].items():
        assert label == index  # one file per class: sample index = list position = label
        assert (src / "train" / wnids[label] / f"{wnids[label]}_0000.JPEG").read_bytes() == image
        assert read_class(np.asarray(Image.open(io.BytesIO(image)))) == label


def test_missing_classes_are_all_listed(tmp_path: Path) -> None:
    """An H-JEPA source under the CMC list: every CMC wnid it lacks is named."""
    src = generate_imagenet100(tmp_path / "src", n_train=1, n_val=0, class_list="hjepa")
    missing = [w for w in builtin_class_list("cmc").wnids if w not in builtin_class_list("hjepa").wnids]
    with pytest.raises(ConversionError, match=rf"train: {len(missing)} of the 100 classes of the cmc class list "
                                              r"have no directory: ") as error:
        convert("imagenet100", src, tmp_path / "out")
    assert str(error.value).endswith(", ".join(missing))
    assert no_output(tmp_path / "out")


def test_missing_class_in_one_split(tmp_path: Path) -> None:
    src, class_file = make_source(tmp_path)
    for wnid in WNIDS[1:]:
        for f in (src / "val" / wnid).iterdir():
            f.unlink()
        (src / "val" / wnid).rmdir()
    with pytest.raises(ConversionError, match=rf"val: 2 of the 3 classes .* no directory: {WNIDS[1]}, {WNIDS[2]}$"):
        convert("imagenet100", src, tmp_path / "out", options={"class_list": str(class_file)})
    assert no_output(tmp_path / "out")


def test_names_column_extra_directories_and_absent_split(tmp_path: Path, caplog) -> None:
    lines = f"# wnid name\n{WNIDS[2]}\ttench\n\n{WNIDS[0]} great white shark\n{WNIDS[1]}"
    src, class_file = make_source(tmp_path, lines, n_val=0)
    (src / "train" / "n99999999").mkdir()
    with caplog.at_level(logging.INFO):
        manifests = convert("imagenet100", src, tmp_path / "out", options={"class_list": str(class_file)})
    assert list(manifests) == ["train"]
    assert manifests["train"].schema.heads[0].class_names == ("tench", "great white shark", WNIDS[1])
    assert caplog.text.count("ignoring 1 directories not in the file:classes.txt class list: n99999999") == 1
    order = (WNIDS[2], WNIDS[0], WNIDS[1])
    samples = read_shards(tmp_path / "out")["train"]
    assert [samples[i] for i in range(6)] == [(f.read_bytes(), label) for f, label in
                                              source_files(src, "train", order)]


def test_resize_gives_the_shorter_side(tmp_path: Path) -> None:
    src, class_file = make_source(tmp_path, bad_files=True)
    manifests = convert("imagenet100", src, tmp_path / "out",
                        options={"class_list": str(class_file), "resize": 40, "quality": 80})
    assert {f.name: f.value for f in manifests["train"].schema.fixed_parameters} == {
        "jpeg_quality": 80, "resize_shorter_side": 40}
    samples = read_shards(tmp_path / "out")
    for split in ("train", "val"):
        expected = source_files(src, split, WNIDS)
        assert len(samples[split]) == len(expected)
        for index, (path, label) in enumerate(expected):
            image = Image.open(io.BytesIO(samples[split][index][0]))
            assert (image.format, image.mode, min(image.size)) == ("JPEG", "RGB", 40)
            source = Image.open(path).size
            assert abs(image.size[0] / image.size[1] - source[0] / source[1]) < 0.05
            assert samples[split][index][1] == label


def _write_bad(path: Path, kind: str) -> None:
    if kind == "unreadable":
        path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
        return
    pixels = Image.fromarray(np.full((20, 30, 3), 90, dtype=np.uint8))
    mode, fmt = {"gray": ("L", "JPEG"), "cmyk": ("CMYK", "JPEG"), "png": ("RGB", "PNG")}[kind]
    pixels.convert(mode).save(path, format=fmt)


BAD_KINDS = {"gray": r"not RGB \(mode L\)", "cmyk": r"not RGB \(mode CMYK\)", "png": r"not a JPEG \(a PNG file\)",
             "unreadable": r"unreadable \(\w*Error: "}


@pytest.mark.parametrize("on_bad", ["convert", "skip", "error"])
@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_file(tmp_path: Path, caplog, kind: str, on_bad: str) -> None:
    src, class_file = make_source(tmp_path)
    bad = src / "train" / WNIDS[1] / f"{WNIDS[1]}_0001a.JPEG"  # sorts between the class's two files
    _write_bad(bad, kind)
    options = {"class_list": str(class_file), "on_bad": on_bad}
    out = tmp_path / "out"
    if on_bad == "error":
        with pytest.raises(ConversionError, match=rf"{bad.name}: {BAD_KINDS[kind]}.*on_bad='error' refuses it"):
            convert("imagenet100", src, out, options=options)
        assert no_output(out)
        return
    with caplog.at_level(logging.WARNING):
        manifests = convert("imagenet100", src, out, shuffle=False, options=options)
    kept = on_bad == "convert" and kind != "unreadable"
    action = "re-encoded as an RGB JPEG" if kept else "skipped"
    assert caplog.text.count(f"{bad.name}: ") == 1 and f": {action}" in caplog.text
    assert ("1 of 7 samples skipped as bad input (see the warnings above); 6 written" in caplog.text) == (not kept)
    assert manifests["train"].num_samples == 6 + kept
    samples = read_shards(out)["train"]
    for index, (path, label) in enumerate(source_files(src, "train", WNIDS)):  # keys: positions in the listing
        if path == bad and not kept:
            assert index not in samples
            continue
        image, found = samples[index]
        assert found == label
        if path == bad:
            decoded = Image.open(io.BytesIO(image))
            assert (decoded.format, decoded.mode, decoded.size) == ("JPEG", "RGB", (30, 20))
        else:
            assert image == path.read_bytes()


def test_no_split_and_bad_options(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match=r"empty: expected train/ and/or val/"):
        convert("imagenet100", tmp_path / "empty", tmp_path / "out")
    src, _ = make_source(tmp_path)
    for options, error in [({"on_bad": "ignore"}, r"option on_bad: expected convert \| skip \| error"),
                           ({"resize": 0}, r"option resize: expected a shorter side"),
                           ({"colour": "red"}, r"unknown option\(s\) in \['colour'\]"),
                           ({"class_list": str(tmp_path / "nope.txt")}, r"nope.txt: class list: .*no such file")]:
        with pytest.raises(ConversionError, match=error):
            convert("imagenet100", src, tmp_path / "out", options=options)
    with pytest.raises(ConversionError, match=r"source format 'vimh' takes no options, found \['resize'\]"):
        convert("vimh", src, tmp_path / "out", options={"resize": 64})
    assert no_output(tmp_path / "out")


def test_duplicate_wnid_in_class_list(tmp_path: Path) -> None:
    src, class_file = make_source(tmp_path)
    class_file.write_text(f"{WNIDS[0]}\n{WNIDS[1]}\n{WNIDS[0]} again\n")
    with pytest.raises(ConversionError, match=rf"classes.txt: line 3: {WNIDS[0]} is already listed on line 1"):
        convert("imagenet100", src, tmp_path / "out", options={"class_list": str(class_file)})


def test_cli_generate_and_convert(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    assert main(["generate", str(src), "--format", "imagenet100", "--train", "1", "--test", "1", "--bad-files"]) == 0
    assert main(["convert", "imagenet100", str(src), str(tmp_path / "out"), "--on-bad", "skip",
                 "--resize", "32", "--quality", "75"]) == 0
    output = capsys.readouterr().out
    assert "train: 100 samples in 1 shards" in output and "val: 100 samples in 1 shards" in output
    assert main(["convert", "imagenet100", str(src), str(tmp_path / "out2"), "--class-list", "hjepa"]) == 2
    assert "of the 100 classes of the hjepa class list have no directory" in capsys.readouterr().err
    assert main(["convert", "vimh", str(src), str(tmp_path / "out3"), "--resize", "32"]) == 2
    assert "source format 'vimh' takes no options" in capsys.readouterr().err
    assert no_output(tmp_path / "out2") and no_output(tmp_path / "out3")


@needs_make
def test_make_shards_imagenet100_from_a_generated_source(tmp_path: Path) -> None:
    run_make(tmp_path, "shards", "DATASET=imagenet100")
    assert (tmp_path / "sources/imagenet100_demo/.generated").exists()
    assert validate(str(tmp_path / "shards/imagenet100"), decode=False, progress=False).splits == {
        "train": 300, "val": 100}


# The fast header check (shard_tools.formats.jpeg_header) against Pillow's: same kind,
# detail and size on every file, whether the fast walk decides or leaves it to Pillow.

def _pillow(data: bytes) -> Probe:
    return probe(io.BytesIO(data))


def _same(found: Probe, expected: Probe) -> None:
    def norm(p: Probe) -> tuple[str, str, tuple[int, int]]:
        return p.kind, re.sub(r"0x[0-9a-fA-F]+|'[^']*'", "X", p.detail), p.size  # BytesIO address, file name
    assert norm(found) == norm(expected)


def _encoded(mode: str, fmt: str, size: tuple[int, int] = (37, 23), **save: object) -> bytes:
    rng = np.random.default_rng(sum(map(ord, mode + fmt)))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0128], exif[0x011A] = 2, 300.0  # resolution unit, x resolution
    return exif


def _ycck() -> bytes:
    """A CMYK JPEG whose Adobe segment says YCCK (transform 2): still mode CMYK to Pillow."""
    data = _encoded("CMYK", "JPEG")
    at = data.index(b"Adobe") + 11
    return data[:at] + b"\x02" + data[at + 1:]


def _mpo() -> bytes:
    out = io.BytesIO()
    first = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    first.save(out, format="MPO", save_all=True, append_images=[first.copy()])
    return out.getvalue()


SAMPLES = {
    **{f"jpeg-{mode}": (lambda mode=mode: _encoded(mode, "JPEG")) for mode in ("L", "RGB", "CMYK")},
    "jpeg-ycck": _ycck,
    "jpeg-progressive": lambda: _encoded("RGB", "JPEG", progressive=True),
    "jpeg-restarts-subsampling": lambda: _encoded("RGB", "JPEG", (300, 17), restart_marker_blocks=1, subsampling=0),
    "jpeg-exif-no-dpi": lambda: _encoded("RGB", "JPEG", exif=_exif()),
    "jpeg-exif-dpi": lambda: _encoded("RGB", "JPEG", exif=_exif(), dpi=(72, 72)),
    "jpeg-icc-comment": lambda: _encoded("RGB", "JPEG", icc_profile=b"\0" * 3000, comment=b"hello"),
    "jpeg-long-header": lambda: _encoded("L", "JPEG", comment=b"c" * 40000),
    "jpeg-quality-100": lambda: _encoded("RGB", "JPEG", quality=100, qtables="web_high"),
    "mpo": _mpo,
    **{f"png-{mode}": (lambda mode=mode: _encoded(mode, "PNG")) for mode in ("L", "RGB", "P", "LA", "RGBA", "I;16")},
    "gif": lambda: _encoded("P", "GIF"),
    "bmp": lambda: _encoded("RGB", "BMP"),
    "webp": lambda: _encoded("RGB", "WEBP"),
    "garbage": lambda: b"\xff\xd8\xff\xe0 this is not really a JPEG",
    "soi-only": lambda: b"\xff\xd8\xff",
    "empty": lambda: b"",
    "text": lambda: b"not an image at all\n" * 10,
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_fast_probe_matches_pillow(tmp_path: Path, name: str) -> None:
    data = SAMPLES[name]()
    expected = _pillow(data)
    _same(probe_bytes(data), expected)
    path = tmp_path / "x.JPEG"
    path.write_bytes(data)
    from_file = probe(path)  # Pillow names the file instead of a BytesIO in its detail
    assert (from_file.kind, from_file.size) == (expected.kind, expected.size)
    if name.startswith("jpeg-"):  # these the fast walk decides itself, except EXIF Pillow parses for a DPI
        assert (jpeg_header(data) is None) == (name == "jpeg-exif-no-dpi")
        assert expected.kind == (OK if name.split("-")[1] not in ("L", "CMYK", "ycck", "long") else NOT_RGB)


@pytest.mark.parametrize("name", ["jpeg-RGB", "jpeg-CMYK", "jpeg-exif-dpi", "jpeg-icc-comment", "mpo"])
def test_fast_probe_matches_pillow_on_every_truncation(name: str) -> None:
    """Every cut of the header (and some of the scan): Pillow may still open a JPEG cut
    after its start of scan, or at a segment boundary; the fast check must agree."""
    data = SAMPLES[name]()
    end = data.index(b"\xff\xda") + 40
    for cut in (*range(end), *range(end, len(data), 97)):
        _same(probe_bytes(data[:cut]), _pillow(data[:cut]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["jpeg-RGB", "jpeg-L", "jpeg-CMYK", "jpeg-exif-dpi", "jpeg-icc-comment",
                             "jpeg-restarts-subsampling", "png-RGB"]),
       edits=st.lists(st.tuples(st.integers(0, 700), st.integers(0, 255)), min_size=1, max_size=4),
       insert=st.one_of(st.none(), st.tuples(st.integers(2, 700), st.binary(min_size=1, max_size=6))))
def test_fast_probe_matches_pillow_on_damaged_headers(name: str, edits: list[tuple[int, int]],
                                                      insert: tuple[int, bytes] | None) -> None:
    data = bytearray(SAMPLES[name]())
    for at, value in edits:
        data[at % len(data)] = value
    if insert is not None:
        data[insert[0]:insert[0]] = insert[1]
    _same(probe_bytes(bytes(data)), _pillow(bytes(data)))


def test_file_gone_since_the_listing(tmp_path: Path) -> None:
    src, class_file = make_source(tmp_path)
    fmt = configure(class_list=str(class_file))
    assert fmt.count_samples(src, "train") == 6
    path = Path(fmt.files(src, "train").paths[3])
    path.unlink()
    (path.parent / "x").mkdir()
    (path.parent / "x").rmdir()  # the class directory's mtime moves on: the listing is made again
    assert fmt.count_samples(src, "train") == 5
    listed = fmt.files(src, "train")
    gone = Path(listed.paths[2])
    stamp = gone.parent.stat()
    gone.unlink()  # gone after the listing, and its directory's time put back: the listing stays
    os.utime(gone.parent, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with pytest.raises(ConversionError, match=rf"{gone.name}: sample 2: cannot read it"):
        list(fmt.iter_blocks(src, "train"))
    (gone.parent / "x").mkdir()  # now listed again, one file short of the plan
    with pytest.raises(ConversionError, match=r"train: sample 4 planned, but the split lists 4 files now"):
        list(fmt.iter_blocks(src, "train", [0, 4]))


@contextlib.contextmanager
def jpeg_opens_logged(log: Path, monkeypatch) -> Iterator[Path]:
    """Append to ``log`` the path of every JPEG ``open``ed meanwhile, in this process or
    in pool processes forked from it (hence a file, not a list)."""
    real_open = builtins.open

    def logged(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(file).endswith((".JPEG", ".jpg", ".jpeg")):
            with real_open(log, "a") as f:
                f.write(f"{file}\n")
        return real_open(file, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", logged)
        yield log


@pytest.mark.parametrize(("workers", "max_bytes"), [(1, None), (2, None), (2, 10**9)])
def test_each_file_is_read_once(tmp_path: Path, monkeypatch, workers: int, max_bytes: int | None) -> None:
    """No scan before writing: a file is opened once, when its sample is written (counted
    in this process, or, with workers, in the pool processes, through a log)."""
    src, class_file = make_source(tmp_path, n_train=5, bad_files=True)
    with jpeg_opens_logged(tmp_path / "opened.txt", monkeypatch) as opened:
        convert("imagenet100", src, tmp_path / "out", options={"class_list": str(class_file), "on_bad": "skip"},
                workers=workers, max_samples=4, max_bytes=max_bytes)
    reads = opened.read_text().splitlines()
    images = [p for p in src.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg")]
    assert sorted(reads) == sorted(map(str, images))


def _digests(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("max_bytes", [None, 10**9])
def test_skipped_files_leave_output_independent_of_workers_and_resumable(tmp_path: Path, monkeypatch,
                                                                         max_bytes: int | None) -> None:
    """Skipped files shorten their shard (planned slices) or the stream; either way 1 and
    2 workers give the same bytes, and a run interrupted after its first shards resumes
    from the right sample (the kept shards cover more positions than samples)."""
    import shard_tools.formats.imagenet100.reader as imagenet100
    from shard_tools.writer import ShardWriter

    monkeypatch.setattr(imagenet100, "FILES_PER_BLOCK", 4)
    src, class_file = make_source(tmp_path, n_train=6, bad_files=True)
    options = {"class_list": str(class_file), "on_bad": "skip"}

    def run(out: Path, workers: int = 1) -> dict[str, dict]:
        return convert("imagenet100", src, out, options=options, max_samples=3, max_bytes=max_bytes, workers=workers)

    one, two = run(tmp_path / "one"), run(tmp_path / "two", workers=2)
    assert one == two and _digests(tmp_path / "one") == _digests(tmp_path / "two")
    listed = configure(**options).count_samples(src, "train")
    assert 0 < one["train"].num_samples < listed
    real, calls = ShardWriter.write_block, []

    def interrupted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "write_block", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "resumed")
    assert list((tmp_path / "resumed" / "train" / ".staging").glob("train-*.tar"))
    assert run(tmp_path / "resumed") == one
    assert _digests(tmp_path / "resumed") == _digests(tmp_path / "one")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_resume_does_not_read_an_empty_slice_again(tmp_path: Path, monkeypatch, workers: int) -> None:
    """One file per shard, so each skipped file leaves a slice with no sample: the progress
    log records it, and a run interrupted just before publishing resumes without opening
    any file again, with the same output as a run never interrupted."""

    from shard_tools.conversion.slices import StagedSplit

    src, class_file = make_source(tmp_path, n_train=3, bad_files=True)

    def run(out: Path) -> dict[str, dict]:
        return convert("imagenet100", src, out, splits=["train"], max_samples=1, max_bytes=None, workers=workers,
                       options={"class_list": str(class_file), "on_bad": "skip"})

    whole = run(tmp_path / "whole")
    assert whole["train"].num_samples < configure(class_list=str(class_file)).count_samples(src, "train")

    def interrupted(self):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(StagedSplit, "publish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "resumed")
    with jpeg_opens_logged(tmp_path / "opened.txt", monkeypatch) as opened:
        assert run(tmp_path / "resumed") == whole
    assert not opened.exists(), opened.read_text()
    assert _digests(tmp_path / "resumed") == _digests(tmp_path / "whole")
