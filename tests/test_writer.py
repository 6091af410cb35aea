"""The shard writer: tar headers equal tarfile's, size limits, atomic publication."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import ConversionError
from pipeline.header import read_header
from pipeline.labels import encode_labels
from pipeline.schema import DatasetSchema, Head, ImageSpec
from shard_tools.convert import convert
from shard_tools.converters import vimh
from shard_tools.writer import RECORD, ShardWriter, _reference_header, tar_end, tar_header, tar_member

SCHEMA = DatasetSchema(name="w", split="train", image=ImageSpec(4, 4, 1),
                       heads=(Head(name="c", kind="class", num_classes=2),))
LABELS = encode_labels({"c": {"class": 1}})


@given(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=100),
       st.integers(0, 8**11 - 1))
def test_fast_tar_header_equals_tarfile(name: str, size: int) -> None:
    assert tar_header(name, size) == _reference_header(name, size)


def test_long_names_get_a_pax_header(tmp_path: Path) -> None:
    name = "k" * 150 + ".raw"
    (tmp_path / "t.tar").write_bytes(tar_member(name, b"abc") + tar_end(0))
    with tarfile.open(tmp_path / "t.tar") as tar:
        (member,) = tar.getmembers()
        assert member.name == name and tar.extractfile(member).read() == b"abc"  # type: ignore[union-attr]


def test_shards_respect_byte_and_sample_limits(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "a", SCHEMA, max_samples=None, max_bytes=3 * RECORD) as w:
        for i in range(60):
            w.write(f"{i:04d}", [("raw", bytes(16)), ("labels.msgpack", LABELS)])
    assert w.manifest is not None
    assert all(s.bytes <= 3 * RECORD for s in w.manifest.shards)
    assert sum(s.samples for s in w.manifest.shards) == 60 and len(w.manifest.shards) > 1
    with ShardWriter(tmp_path / "b", SCHEMA, max_samples=7, max_bytes=None) as w:
        for i in range(20):
            w.write(f"{i:04d}", [("raw", bytes(16)), ("labels.msgpack", LABELS)])
    assert [s.samples for s in w.manifest.shards] == [7, 7, 6]  # type: ignore[union-attr]
    for shard in w.manifest.shards:  # type: ignore[union-attr]
        assert read_header(str(tmp_path / "b" / shard.name)) == SCHEMA
        with tarfile.open(tmp_path / "b" / shard.name) as tar:
            assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in tar)


def test_bad_limits_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"max_samples: expected >= 1, found 0"):
        ShardWriter(tmp_path, SCHEMA, max_samples=0)
    with pytest.raises(ConversionError, match=r"max_bytes: expected >= 1, found -5"):
        ShardWriter(tmp_path, SCHEMA, max_bytes=-5)


def test_empty_split_is_an_error_and_publishes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"no samples were written for split 'train'"), \
            ShardWriter(tmp_path / "e", SCHEMA):
        pass
    assert not list((tmp_path / "e").iterdir())


def test_error_inside_the_writer_publishes_nothing(tmp_path: Path) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), ShardWriter(tmp_path / "x", SCHEMA, max_samples=2) as w:
        for i in range(5):
            w.write(f"{i:04d}", [("raw", bytes(16)), ("labels.msgpack", LABELS)])
        raise Boom
    assert not list((tmp_path / "x").iterdir())


def test_failure_in_a_later_split_publishes_no_split(tmp_path: Path, vimh_source, monkeypatch) -> None:
    src = vimh_source()
    real = vimh.iter_samples

    def failing(src, split, indices=None):
        for n, sample in enumerate(real(src, split, indices)):
            if split == "test" and n == 5:
                raise ConversionError(f"{src}: sample {sample.index}: simulated read failure")
            yield sample

    monkeypatch.setattr(vimh, "iter_samples", failing)
    with pytest.raises(ConversionError, match=r"simulated read failure"):
        convert("vimh", src, tmp_path / "out", max_samples=8)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []
