"""Convert → validate → load → compare to the source, pixel- and label-exact."""

from __future__ import annotations

import subprocess
from pathlib import Path

import msgpack
import numpy as np
import pytest
import webdataset as wds

from pipeline.format.header import HEADER_MEMBER
from pipeline.format.label_columns import LABELS_MEMBER
from pipeline.io.reading import decode_image, iter_shard, read_header
from shard_tools.convert import convert
from tests.conftest import convert_validated, read_vimh_source

CASES = [
    ("pickle", 1, 1), ("pickle", 3, 2), ("pickle", 3, 4),
    ("binary", 1, 3), ("binary", 3, 2), ("binary", 3, 4),
    ("binary-v1", 3, 1), ("binary-v1", 1, 4),
]


@pytest.mark.parametrize(("variant", "channels", "heads"), CASES)
def test_vimh_roundtrip_is_pixel_and_label_exact(tmp_path: Path, vimh_source, variant: str,
                                                 channels: int, heads: int) -> None:
    src = vimh_source(f"vimh-6x5x{channels}_rt", variant=variant, n_heads=heads, n_train=37, n_test=9)
    out = tmp_path / "out"
    manifests = convert_validated("vimh", src, out, {"train": 37, "test": 9}, max_samples=10)
    for split, manifest in manifests.items():
        source = read_vimh_source(src, split)
        schema = manifest.schema
        assert schema.image.shape_chw == (channels, 6, 5)
        assert [h.source_id for h in schema.heads] == list(range(heads))
        seen = {}
        for shard in manifest.shards:
            assert read_header(str(out / split / shard.name)) == schema
            for key, members in iter_shard(str(out / split / shard.name)):
                seen[int(key)] = members
        assert sorted(seen) == sorted(source)
        for index, members in seen.items():
            pixels, labels = source[index]
            image = decode_image(schema.image, members["raw"])
            # planar CHW, exactly as the source stores it
            assert image.tobytes() == pixels
            assert np.array_equal(image, np.frombuffer(pixels, np.uint8).reshape(channels, 6, 5))
            record = msgpack.unpackb(members["labels.msgpack"])
            for head in schema.heads:
                q = labels[head.source_id]
                assert record[head.name]["q"] == q
                assert record[head.name]["value"] == head.min + q / 255 * (head.max - head.min)
                assert record[head.name]["class"] == head.class_of_quantized(q)


def test_stock_webdataset_yields_exactly_the_samples_and_no_header(tmp_path: Path,
                                                                    vimh_source) -> None:
    src = vimh_source()
    manifest = convert("vimh", src, tmp_path / "out", max_samples=16)["train"]
    urls = [str(tmp_path / "out/train" / s.name) for s in manifest.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    source = read_vimh_source(src, "train")
    assert sorted(int(s["__key__"]) for s in samples) == sorted(source)
    assert all(set(s) == {"__key__", "__url__", "__local_path__", "raw", "labels.msgpack"}
               for s in samples)
    assert all(s["raw"] == source[int(s["__key__"])][0] for s in samples)


def test_gnu_tar_lists_header_first_then_samples(vimh_shards: Path) -> None:
    shard = vimh_shards / "train" / "train-000000.tar"
    names = subprocess.run(["tar", "tf", str(shard)], check=True, capture_output=True,
                           text=True).stdout.split()
    assert names[0] == HEADER_MEMBER and names[-1] == LABELS_MEMBER
    assert len(names) == 1 + 2 * 16 + 1
    assert all(n.endswith((".raw", ".labels.msgpack")) for n in names[1:-1])


def test_shards_are_deterministic(tmp_path: Path, vimh_source) -> None:
    src = vimh_source()
    a = convert("vimh", src, tmp_path / "a", max_samples=16)
    b = convert("vimh", src, tmp_path / "b", max_samples=16)
    c = convert("vimh", src, tmp_path / "c", max_samples=16, seed=1)
    for split in a:
        for sa, sb in zip(a[split].shards, b[split].shards, strict=True):
            assert (tmp_path / "a" / split / sa.name).read_bytes() == \
                (tmp_path / "b" / split / sb.name).read_bytes()
    assert [s.sha256 for s in a["train"].shards] != [s.sha256 for s in c["train"].shards]


def test_unshuffled_conversion_keeps_source_order(tmp_path: Path, vimh_source) -> None:
    manifest = convert("vimh", vimh_source(), tmp_path / "o", shuffle=False)["train"]
    keys = [k for s in manifest.shards for k, _ in iter_shard(str(tmp_path / "o/train" / s.name))]
    assert keys == [f"{i:08d}" for i in range(40)]
