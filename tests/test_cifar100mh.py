"""CIFAR-100-MH converter, both layouts: round trip pixel- and label-exact, planar CHW
pixels, and every bad input a ConversionError naming file and sample, with no output."""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline import make_loader
from pipeline.errors import ConversionError
from pipeline.io.reading import iter_shard
from shard_tools.cli import main
from shard_tools.convert import convert
from shard_tools.formats.cifar100mh import reader as cifar100mh
from shard_tools.formats.cifar100mh.synthetic import (
    ClassParam,
    generate_cifar100,
    generate_cifar100mh,
    python2_pickle,
    read_class,
)
from tests.conftest import convert_validated, no_output

# a head whose min is not 0: 10 classes, stored values 0..9 (the value is the class index)
MH_PARAMS = (ClassParam("fine", 0, 99, "fine class"), ClassParam("decade", 1, 10, "fine // 10"))
# the release as Python 2 pickled it, then re-pickled by Python 3 with bytes or str keys
LAYOUTS = ("cifar100mh", "cifar100", "cifar100-py3-bytes-keys", "cifar100-py3-str-keys")
Source = dict[int, tuple[bytes, dict[str, int]]]


def make_source(root: Path, layout: str, n_train: int = 40, n_test: int = 12) -> Path:
    if layout == "cifar100mh":
        return generate_cifar100mh(root / "cifar100mh_src", n_train=n_train, n_test=n_test, params=MH_PARAMS)
    return generate_cifar100(root / "cifar-100-python", n_train=n_train, n_test=n_test,
                             python2=layout == "cifar100", bytes_keys=layout.endswith("bytes-keys"))


def read_source(src: Path, split: str) -> Source:
    """Independent reader (test oracle): index -> (CHW pixels, {head: class})."""
    if (src / f"{split}_batch").exists():
        batch = pickle.loads((src / f"{split}_batch").read_bytes())
        names = json.loads((src / "cifar100mh_dataset_info.json").read_text())["parameter_names"]
        return {i: (row.tobytes(), {names[pid]: v for pid, v in zip(lab[1::2], lab[2::2], strict=True)})
                for i, (row, lab) in enumerate(zip(batch["data"], batch["cifar100mh_labels"], strict=True))}
    with open(src / split, "rb") as f:
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in pickle.load(f, encoding="bytes").items()}
    return {i: (row.tobytes(), {"fine": fine, "coarse": coarse}) for i, (row, fine, coarse) in
            enumerate(zip(batch["data"], batch["fine_labels"], batch["coarse_labels"], strict=True))}


def edit_pickle(path: Path, edit: Callable[[dict], None]) -> None:
    """Edit a pickle and write it back: release files (``train``, ``test``, ``meta``) as
    Python 2 pickled them, ``*_batch`` files as Python 3 pickles."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    edit(batch)
    path.write_bytes(pickle.dumps(batch, protocol=2) if path.name.endswith("_batch") else python2_pickle(batch))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_roundtrip_is_pixel_and_label_exact(tmp_path: Path, layout: str) -> None:
    src = make_source(tmp_path, layout, n_train=37, n_test=9)
    out = tmp_path / "out"
    manifests = convert_validated("cifar100mh", src, out, {"train": 37, "test": 9}, max_samples=10)
    for split, manifest in manifests.items():
        schema, source = manifest.schema, read_source(src, split)
        assert schema.image.describe() == "32x32x3 raw CHW"
        assert all(h.kind == "class" for h in schema.heads)
        if layout == "cifar100mh":
            assert [(h.name, h.num_classes, h.source_id) for h in schema.heads] == [("fine", 100, 0),
                                                                                   ("decade", 10, 1)]
            assert schema.provenance.source_format == "cifar100mh-pickle"
        else:
            assert [(h.name, h.num_classes) for h in schema.heads] == [("fine", 100), ("coarse", 20)]
            assert schema.head("coarse").class_names[3] == "coarse_03"
            assert schema.provenance.source_format == "cifar100-python"
        loader = make_loader(str(out), split=split, batch_size=8, num_workers=0, with_keys=True, shuffle=False)
        seen = set()
        for images, labels, keys in loader:
            assert tuple(images.shape[1:]) == (3, 32, 32)
            for row, key in enumerate(keys):
                pixels, classes = source[int(key)]
                assert images[row].numpy().tobytes() == pixels
                assert {head: int(labels[head][row]) for head in schema.head_names} == classes
                seen.add(int(key))
        assert seen == set(source)


@pytest.mark.parametrize("layout", LAYOUTS[:2])
def test_pixels_stay_planar_chw(tmp_path: Path, layout: str) -> None:
    """Rows are 1024 R, 1024 G, 1024 B bytes; the shard keeps them as they are."""
    src = make_source(tmp_path, layout, n_train=4, n_test=1)
    planes = np.stack([np.arange(1024) % 251, np.zeros(1024), np.full(1024, 77)]).astype(np.uint8)
    split_file = src / ("train_batch" if layout == "cifar100mh" else "train")

    def put_image(batch: dict) -> None:
        key = b"data" if b"data" in batch else "data"
        batch[key][2] = planes.reshape(-1)
    edit_pickle(split_file, put_image)
    out = tmp_path / "out"
    manifest = convert("cifar100mh", src, out, shuffle=False, splits=["train"])["train"]
    members = dict(iter_shard(str(out / "train" / manifest.shards[0].name)))["00000002"]
    assert members["raw"] == planes.tobytes()
    images, _ = next(iter(make_loader(str(out), split="train", batch_size=4, num_workers=0, shuffle=False)))
    red, green, blue = images[2].numpy()
    assert np.array_equal(red, planes[0].reshape(32, 32))
    assert not green.any() and (blue == 77).all()


def test_synthetic_labels_can_be_read_from_the_pixels(tmp_path: Path) -> None:
    for layout in LAYOUTS[:2]:
        for pixels, classes in read_source(make_source(tmp_path, layout, n_train=200), "train").values():
            assert read_class(np.frombuffer(pixels, np.uint8).reshape(3, 32, 32)) == classes["fine"]
            assert classes.get("coarse", classes["fine"] // 5) == classes["fine"] // 5


def test_release_pickles_are_written_as_python_2_wrote_them(tmp_path: Path) -> None:
    """Protocol 2, strings as Python 2 byte strings, numpy.core globals: torchvision's
    ``encoding="latin1"`` gives str keys, ``encoding="bytes"`` bytes keys, the same pixels."""
    src = make_source(tmp_path, "cifar100", n_train=6, n_test=2)
    raw = (src / "train").read_bytes()
    assert raw.startswith(b"\x80\x02}") and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    assert b"_codecs" not in raw and b"U\x04data" in raw  # Python 3's protocol 2 would call _codecs.encode
    as_text, as_bytes = (pickle.loads(raw, encoding=e) for e in ("latin1", "bytes"))
    assert sorted(as_text) == ["batch_label", "coarse_labels", "data", "filenames", "fine_labels"]
    assert np.array_equal(as_text["data"], as_bytes[b"data"]) and as_text["data"].shape == (6, 3072)
    assert python2_pickle({"a": b"x" * 300}) == b"\x80\x02}q\x00U\x01aT,\x01\x00\x00" + b"x" * 300 + b"s."


def test_mh_labels_key_and_vimh_json_fallback(tmp_path: Path, caplog) -> None:
    src = make_source(tmp_path, "cifar100mh")
    edit_pickle(src / "train_batch", lambda b: b.update(labels=b.pop("cifar100mh_labels")))
    (src / "cifar100mh_dataset_info.json").rename(src / "vimh_dataset_info.json")
    with caplog.at_level(logging.INFO):
        schema = convert("cifar100mh", src, tmp_path / "out")["train"].schema
    assert schema.head_names == ("fine", "decade")
    assert "no cifar100mh_dataset_info.json; using vimh_dataset_info.json" in caplog.text


def test_cli_generates_both_layouts(tmp_path: Path, capsys) -> None:
    for fmt in ("cifar100mh", "cifar100"):
        assert main(["generate", str(tmp_path / fmt), "--format", fmt, "--train", "20", "--test", "5"]) == 0
        assert main(["convert", "cifar100mh", str(tmp_path / fmt), str(tmp_path / f"{fmt}_out")]) == 0
        assert "train: 20 samples in 1 shards" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cifar100").iterdir()) == ["meta", "test", "train"]


def _set(key: str, index: int, value: object) -> Callable[[dict], None]:
    def edit(batch: dict) -> None:
        batch[key.encode() if key.encode() in batch else key][index] = value
    return edit


def _pop(key: str) -> Callable[[dict], None]:
    return lambda batch: batch.pop(key.encode() if key.encode() in batch else key)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


MH, STD = "cifar100mh", "cifar100"
BAD_PICKLES = [  # layout, file, edit, error
    (MH, "train_batch", None, r"train_batch: expected a CIFAR-100-MH pickle, found a truncated or corrupt"),
    (STD, "train", None, r"train: expected a CIFAR-100 pickle, found a truncated or corrupt"),
    (STD, "meta", None, r"meta: expected a CIFAR-100 pickle, found a truncated or corrupt"),
    (MH, "train_batch", _pop("data"), r"train_batch: expected a dict with 'data' and 'cifar100mh_labels'"),
    (STD, "train", _pop("data"), r"train: expected a dict with \['data', 'fine_labels', 'coarse_labels'\], "
                                 r"missing \['data'\]"),
    (STD, "meta", _pop("coarse_label_names"), r"meta: expected a dict .* missing \['coarse_label_names'\]"),
    (MH, "test_batch", _set("cifar100mh_labels", 5, [2, 0, 7, 1, 10]),
     r"test_batch: sample 5: head 'decade' expected a class index in 0..9, found 10"),
    (MH, "train_batch", _set("cifar100mh_labels", 8, [2, 0, 300, 1, 1]),
     r"train_batch: sample 8: head 'fine' expected a class index in 0..99, found 300"),
    (MH, "train_batch", _set("cifar100mh_labels", 2, [2, 0, -1, 1, 1]),
     r"train_batch: sample 2: head 'fine' expected a class index in 0..99, found -1"),
    (STD, "train", _set("fine_labels", 3, 100), r"train: sample 3: head 'fine' expected a class index in 0..99, "
                                                r"found 100"),
    (STD, "test", _set("coarse_labels", 4, 20), r"test: sample 4: head 'coarse' expected a class index in 0..19, "
                                                r"found 20"),
    (MH, "train_batch", _set("cifar100mh_labels", 7, [2, 0, 1, 1]),
     r"train_batch: sample 7: label list .* has 4 entries, expected 1\+2N = 5"),
    (MH, "train_batch", _set("cifar100mh_labels", 3, [1, 0, 9]),
     r"train_batch: sample 3: N = 1, but sample 0 has N = 2 .*mixed N"),
    (MH, "train_batch", lambda b: b.update(data=b["data"][:, :-1]),
     r"train_batch: sample 0: image has 3071 bytes, expected H\*W\*C = 3072"),
    (STD, "train", lambda b: b.update({b"data": b[b"data"][:, :-1]}),
     r"train: sample 0: image has 3071 bytes, expected H\*W\*C = 3072"),
    (MH, "train_batch", lambda b: b.update(height=16, width=16, channels=12),
     r"image dimensions \(HxWxC\) disagree: .*cifar100mh_dataset_info.json says 32x32x3, .*train_batch says 16x16x12"),
    (STD, "train", lambda b: b[b"fine_labels"].pop(), r"train: 'fine_labels' expected 40 integers .* found 39"),
    (MH, "test_batch", lambda b: b.update(data=b["data"][:0], cifar100mh_labels=[]),
     r"test_batch: empty dataset: no samples"),
]


@pytest.mark.parametrize(("layout", "name", "edit", "error"), BAD_PICKLES)
def test_bad_pickle(tmp_path: Path, layout: str, name: str, edit: Callable[[dict], None] | None,
                    error: str) -> None:
    src = make_source(tmp_path, layout)
    if edit is None:
        _truncate(src / name)
    else:
        edit_pickle(src / name, edit)
    with pytest.raises(ConversionError, match=error):
        convert("cifar100mh", src, tmp_path / "out", max_samples=8)
    assert no_output(tmp_path / "out")


def _write_json(text: str) -> Callable[[Path], None]:
    return lambda src: (src / "cifar100mh_dataset_info.json").write_text(text)


def _edit_json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def run(src: Path) -> None:
        info = json.loads((src / "cifar100mh_dataset_info.json").read_text())
        edit(info)
        (src / "cifar100mh_dataset_info.json").write_text(json.dumps(info))
    return run


BAD_DIRECTORIES = [  # layout, change to the source directory, error
    (MH, _write_json('{"parameter_names": ['), r"cifar100mh_dataset_info.json: expected JSON, found unparsable text"),
    (MH, lambda src: (src / "cifar100mh_dataset_info.json").unlink(),
     r"expected cifar100mh_dataset_info.json or vimh_dataset_info.json .*found neither"),
    (MH, _edit_json(lambda i: i["parameter_mappings"].pop("decade")),
     r"cifar100mh_dataset_info.json: parameter_mappings: expected an entry for 'decade' \(parameter id 1\)"),
    (MH, _edit_json(lambda i: i["parameter_mappings"]["fine"].update(min=5, max=2)),
     r"parameter_mappings\['fine'\]: expected integer min <= max, found min 5, max 2"),
    (MH, _edit_json(lambda i: i.update(image_size="16x16x3")),
     r"train_batch: sample 0: image has 3072 bytes, expected H\*W\*C = 768 for 16x16x3"),
    (STD, lambda src: (src / "meta").unlink(), r"meta: missing; the CIFAR-100 python layout needs it"),
    (STD, lambda src: (src / "train_batch").write_bytes(b""), r"holds both layouts \(\['train_batch'\] and "
                                                               r"\['train', 'test'\]\)"),
]


@pytest.mark.parametrize(("layout", "change", "error"), BAD_DIRECTORIES)
def test_bad_directory(tmp_path: Path, layout: str, change: Callable[[Path], None], error: str) -> None:
    src = make_source(tmp_path, layout)
    change(src)
    with pytest.raises(ConversionError, match=error):
        convert("cifar100mh", src, tmp_path / "out")
    assert no_output(tmp_path / "out")


def test_nonexistent_directory(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"nowhere: no such directory \(expected a CIFAR-100-MH or CIFAR-100"):
        convert("cifar100mh", tmp_path / "nowhere", tmp_path / "out")
    assert no_output(tmp_path / "out")


def test_directory_with_neither_layout_lists_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "data_batch_1").write_bytes(b"cifar-10?")
    with pytest.raises(ConversionError, match=r"src: neither layout: expected CIFAR-100-MH \(train_batch and/or "
                                              r"test_batch with cifar100mh_dataset_info.json or vimh_dataset_info"
                                              r".json\) or the CIFAR-100 python release \(train and/or test with "
                                              r"meta\), found \['data_batch_1'\]"):
        convert("cifar100mh", tmp_path / "src", tmp_path / "out")
    assert no_output(tmp_path / "out")


@pytest.mark.parametrize("layout", ["cifar100mh", "cifar100"])
def test_a_changed_file_is_reloaded_and_its_old_contents_released(tmp_path: Path, layout: str) -> None:
    """Loads are cached per file state; a new state replaces the old one instead of
    joining it (a long-lived process would otherwise hold a copy of every state)."""
    src = make_source(tmp_path, layout)
    split_file = src / ("train_batch" if layout == "cifar100mh" else "train")
    first = cifar100mh._load(src, "train")
    assert cifar100mh._load(src, "train") is first  # same state: cached
    old_images = weakref.ref(first.images)
    stat = split_file.stat()
    os.utime(split_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    del first
    second = cifar100mh._load(src, "train")
    gc.collect()
    assert old_images() is None and second.images is not None
