"""Bad shards under both error policies: a clear error by default, exact epochs when skipping."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image

from pipeline import make_loader
from pipeline.errors import HeaderMismatchError, PipelineError, ShardFormatError
from pipeline.format.label_columns import LABELS_MEMBER
from pipeline.format.schema import DatasetSchema, Head, ImageSpec
from shard_tools.convert import convert
from shard_tools.validate import validate
from shard_tools.writer import ShardWriter
from tests.test_validate import rewrite


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    from shard_tools.formats.vimh.synthetic import generate_vimh

    root = tmp_path_factory.mktemp("bad")
    src = generate_vimh(root / "vimh-8x8x1_b", n_train=48, n_test=4, height=8, width=8, channels=1)
    convert("vimh", src, root / "out", max_samples=16)
    return root / "out"


@pytest.fixture
def shards(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "out"))


def count(loader) -> int:
    return sum(len(keys) for _, _, keys in loader)


def test_truncated_shard(shards: Path, caplog) -> None:
    shard = shards / "train" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:7000])
    with pytest.raises(ShardFormatError, match=r"differ in size from the manifest \(.*train-000001.tar: 40960 "
                                               r"bytes listed, 7000 found"):
        count(make_loader(str(shards), batch_size=8, num_workers=0, with_keys=True))
    with caplog.at_level(logging.WARNING):
        n = count(make_loader(str(shards), batch_size=8, num_workers=0, on_error="skip", with_keys=True))
    assert n == 48 - 16 + 7000 // 1024  # the shard is planned by what its 7000 bytes can hold, not by its listing
    assert "train-000001.tar" in caplog.text and "repeating others to keep the epoch exact" in caplog.text


def test_missing_label_member(shards: Path, caplog) -> None:
    rewrite(shards / "train" / "train-000002.tar", lambda m: [x for x in m if x[0] != m[4][0]])
    with pytest.raises(ShardFormatError, match=r"train-000002.tar: \d{8}.labels.msgpack: missing label member"):
        count(make_loader(str(shards), batch_size=8, num_workers=2, with_keys=True))
    with caplog.at_level(logging.WARNING):
        loader = make_loader(str(shards), batch_size=8, num_workers=0, on_error="skip", with_keys=True)
        assert count(loader) == 48
    assert "skipped 1 bad sample(s)" in caplog.text and "missing label member" in caplog.text


def test_label_out_of_schema(shards: Path) -> None:
    """Without a __labels__ member the loader decodes every label member and checks it."""
    def drop_head(members):
        record = msgpack.unpackb(members[2][1])
        del record["note_number"]
        members[2] = (members[2][0], msgpack.packb(record))
        return [m for m in members if m[0] != LABELS_MEMBER]
    rewrite(shards / "train" / "train-000000.tar", drop_head)
    with pytest.raises(ShardFormatError, match=r"labels do not decode to every head's class \(KeyError"):
        count(make_loader(str(shards), batch_size=8, num_workers=0, with_keys=True))


def test_label_columns_must_agree_with_label_members(shards: Path) -> None:
    """With a __labels__ member the loader reads the columns; the validator checks them."""
    def change_class(members):
        record = msgpack.unpackb(members[2][1])
        record["note_number"]["class"] = (record["note_number"]["class"] + 1) % 13
        record["note_number"]["q"] = next(q for q in range(256) if Head.quantized("n", 40, 88, 4)
                                          .class_of_quantized(q) == record["note_number"]["class"])
        record["note_number"]["value"] = 40 + record["note_number"]["q"] / 255 * 48
        members[2] = (members[2][0], msgpack.packb(record))
        return members
    rewrite(shards / "train" / "train-000000.tar", change_class)
    problems = [str(p) for p in validate(str(shards), progress=False).problems]
    assert any("train-000000.tar: __labels__: disagrees with 1 sample label member(s), first: sample 0" in p
               for p in problems), problems


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_and_misshapen_png_images(tmp_path: Path, caplog) -> None:
    schema = DatasetSchema(name="pngs", split="train",
                           image=ImageSpec(height=4, width=5, channels=3, encoding="png", layout="HWC"),
                           heads=(Head(name="label", kind="class", num_classes=3),))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (4, 5, 3), dtype=np.uint8) for _ in range(10)]
    with ShardWriter(tmp_path / "train", schema) as writer:
        for i, image in enumerate(images):
            data = b"garbage" if i == 3 else _png(image[:, :4] if i == 6 else image)
            writer.write(f"{i:04d}", [("png", data), ("labels.msgpack", msgpack.packb({"label": {"class": i % 3}}))])
    with pytest.raises(ShardFormatError, match=r"train-000000.tar: 0003.png: image does not decode"):
        count(make_loader(str(tmp_path / "train"), batch_size=10, num_workers=0, shuffle=False, with_keys=True))
    loader = make_loader(str(tmp_path / "train"), batch_size=10, num_workers=0, shuffle=False, on_error="skip",
                         with_keys=True)
    with caplog.at_level(logging.WARNING):
        ((batch, _, keys),) = list(loader)
    assert batch.shape == (10, 3, 4, 5) and len(keys) == 10
    assert "0003" not in keys and "0006" not in keys
    assert np.array_equal(batch[0].permute(1, 2, 0).numpy(), images[0])
    assert "expected CxHxW (3, 4, 5), found (3, 4, 4)" in caplog.text


def test_shards_that_disagree_fail_before_the_first_batch(shards: Path) -> None:
    def rename(members):
        header = json.loads(members[0][1])
        header["heads"][0]["description"] = "changed"
        return [(members[0][0], json.dumps(header, sort_keys=True, separators=(",", ":")).encode()), *members[1:]]
    rewrite(shards / "train" / "train-000002.tar", rename)
    with pytest.raises(HeaderMismatchError, match=r"1 shard\(s\) disagree with the split's schema .*train-000002.tar"):
        make_loader(str(shards), batch_size=8, num_workers=0)


def test_missing_shard(shards: Path) -> None:
    (shards / "train" / "train-000001.tar").unlink()
    with pytest.raises(ShardFormatError, match=r"train-000001.tar: shard not found"):
        make_loader(str(shards), batch_size=8, num_workers=0)


def test_images_of_varying_size_need_a_transform(tmp_path: Path) -> None:
    from torchvision.transforms import v2

    from shard_tools.validate import validate
    from tests.fakes import class_shards

    root = class_shards(tmp_path, "imagenet100", n=20)
    with pytest.raises(PipelineError, match=r"vary in size \(\(varying\)x3 jpg HWC\); "
                                            r"pass decode=pipeline.DecodeSpec\(224\) .* or a transform"):
        make_loader(str(root), batch_size=8, num_workers=0)
    loader = make_loader(str(root), batch_size=8, num_workers=0, transform=v2.CenterCrop(20), with_keys=True)
    shapes = [tuple(images.shape) for images, _, _ in loader]
    assert shapes == [(8, 3, 20, 20), (8, 3, 20, 20), (4, 3, 20, 20)]
    uneven = make_loader(str(root), batch_size=8, num_workers=0, transform=lambda x: x)
    with pytest.raises(ShardFormatError, match=r"a batch's images have \d+ different shapes .* one size"):
        next(iter(uneven))
    assert validate(str(root), decode=True, progress=False).ok
