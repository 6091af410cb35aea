"""The shard writer: tar headers equal tarfile's, block writes equal sample writes, size
limits, atomic publication."""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConversionError
from pipeline.format.header import HEADER_MEMBER, header_bytes
from pipeline.format.labels import encode_labels
from pipeline.format.schema import DatasetSchema, Head, ImageSpec
from pipeline.format.tar_write import (
    RECORD,
    Rows,
    _reference_header,
    tar_block,
    tar_end,
    tar_header,
    tar_headers,
    tar_member,
    tar_pieces,
)
from pipeline.io.reading import read_header
from shard_tools.conversion.blocks import check_block
from shard_tools.convert import convert
from shard_tools.formats import SampleBlock
from shard_tools.formats.mh_pickles import _parse_each, _parse_table
from shard_tools.formats.vimh import reader as vimh
from shard_tools.writer import ShardWriter

SCHEMA = DatasetSchema(name="w", split="train", image=ImageSpec(4, 4, 1),
                       heads=(Head(name="c", kind="class", num_classes=2),))
LABELS = encode_labels({"c": {"class": 1}})
NAMES = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=100)


@given(NAMES, st.integers(0, 8**11 - 1))
def test_fast_tar_header_equals_tarfile(name: str, size: int) -> None:
    assert tar_header(name, size) == _reference_header(name, size)


@given(st.lists(st.tuples(NAMES, st.integers(0, 8**11 - 1)), min_size=1, max_size=20))
def test_vectorized_tar_headers_equal_tar_header(members: list[tuple[str, int]]) -> None:
    names = np.array([name for name, _ in members], dtype="S100").view(np.uint8).reshape(-1, 100)
    headers = tar_headers(names, np.array([size for _, size in members], dtype=np.int64))
    for row, (name, size) in zip(headers, members, strict=True):
        assert row.tobytes() == tar_header(name, size)


KEYS = st.text("0123456789abc_-", min_size=0, max_size=12)


@given(st.lists(st.tuples(KEYS, st.binary(max_size=1100), st.binary(min_size=1, max_size=80)),
                min_size=1, max_size=12), st.sampled_from(["raw", "png", "labels.msgpack", "x" * 90]))
def test_tar_block_equals_tar_members_or_declines(samples: list[tuple[str, bytes, bytes]], ext: str) -> None:
    keys = [key for key, _, _ in samples]
    first = _padded([image for _, image, _ in samples])
    second = _padded([labels for _, _, labels in samples])
    block = tar_block(keys, [(ext, first), ("labels.msgpack", second)])
    expected = [tar_member(f"{key}.{ext}", image) + tar_member(f"{key}.labels.msgpack", labels)
                for key, image, labels in samples]
    same_size = len({len(e) for e in expected}) == 1
    fits = all(len(f"{key}.{ext}") <= 100 for key in keys)
    assert (block is not None) == (same_size and fits)
    if block is not None:
        assert [row.tobytes() for row in block] == expected


@settings(deadline=None)
@given(st.lists(st.tuples(KEYS, st.binary(max_size=1100), st.binary(min_size=1, max_size=80)),
                min_size=1, max_size=12), st.sampled_from(["jpg", "labels.msgpack", "x" * 90]))
def test_tar_pieces_equal_tar_members_or_decline(samples: list[tuple[str, bytes, bytes]], ext: str) -> None:
    keys = [key for key, _, _ in samples]
    images = [image for _, image, _ in samples]
    laid_out = tar_pieces(keys, [(ext, images), ("labels.msgpack", _padded([labels for _, _, labels in samples]))])
    fits = all(len(f"{key}.{ext}") <= 100 and len(f"{key}.labels.msgpack") <= 100 for key in keys)
    assert (laid_out is not None) == fits
    if laid_out is not None:
        pieces, per_sample, sizes = laid_out
        expected = [tar_member(f"{key}.{ext}", image) + tar_member(f"{key}.labels.msgpack", labels)
                    for key, image, labels in samples]
        joined = [b"".join(pieces[i * per_sample:(i + 1) * per_sample]) for i in range(len(samples))]
        assert joined == expected and sizes.tolist() == [len(e) for e in expected]


def _padded(datas: list[bytes]) -> Rows:
    width = max(len(d) for d in datas)
    rows = np.zeros((len(datas), width + 3), dtype=np.uint8)
    for i, d in enumerate(datas):
        rows[i, :len(d)] = np.frombuffer(d, dtype=np.uint8)
    return Rows(rows, np.array([len(d) for d in datas]))


def tarfile_archive(members: list[tuple[str, bytes]]) -> bytes:
    """The same members written by :mod:`tarfile` with the writer's fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_fast_block_path_equals_tarfile(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 16), dtype=np.uint8)
    labels = [encode_labels({"c": {"class": int(i % 2)}}) for i in range(50)]
    keys = [f"{i:08d}" for i in rng.permutation(50)]
    with ShardWriter(tmp_path, SCHEMA, max_samples=None) as w:
        for start in (0, 7, 30):
            end = {0: 7, 7: 30, 30: 50}[start]
            w.write_block(keys[start:end], [("raw", Rows(images[start:end])),
                                            ("labels.msgpack", _padded(labels[start:end]))])
    members = [(HEADER_MEMBER, header_bytes(SCHEMA))]
    for key, image, label in zip(keys, images, labels, strict=True):
        members += [(f"{key}.raw", image.tobytes()), (f"{key}.labels.msgpack", label)]
    assert (tmp_path / "train-000000.tar").read_bytes() == tarfile_archive(members)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=40), st.lists(st.integers(1, 9), min_size=1),
       st.one_of(st.none(), st.integers(1, 12)), st.one_of(st.none(), st.integers(1, 8 * RECORD)),
       st.booleans())
def test_write_block_equals_write(label_sizes: list[int], cuts: list[int], max_samples: int | None,
                                  max_bytes: int | None, as_bytes: bool) -> None:
    """Any block cuts, limits and member kinds (fast path or one by one) give the same shards."""
    images = [bytes([i % 251]) * 16 for i in range(len(label_sizes))]
    labels = [bytes([i % 7 + 1]) * size for i, size in enumerate(label_sizes)]
    keys = [f"{i:08d}" for i in range(len(labels))]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        with ShardWriter(one, SCHEMA, max_samples=max_samples, max_bytes=max_bytes) as w1:
            for key, image, label in zip(keys, images, labels, strict=True):
                w1.write(key, [("raw", image), ("labels.msgpack", label)])
        with ShardWriter(many, SCHEMA, max_samples=max_samples, max_bytes=max_bytes) as w2:
            start = 0
            for cut in cuts * len(labels):
                end = min(start + cut, len(labels))
                image_rows = np.frombuffer(b"".join(images[start:end]), np.uint8).reshape(-1, 16)
                members = [("raw", images[start:end] if as_bytes else Rows(image_rows)),
                           ("labels.msgpack", _padded(labels[start:end]) if end > start else [])]
                w2.write_block(keys[start:end], members)
                start = end
        assert w1.manifest == w2.manifest
        for shard in w1.manifest.shards:  # type: ignore[union-attr]
            assert (one / shard.name).read_bytes() == (many / shard.name).read_bytes()


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


@pytest.mark.parametrize(("workers", "max_bytes"), [(1, None), (2, None), (1, 10**9)])
def test_failed_write_on_the_write_behind_thread(tmp_path: Path, vimh_source, monkeypatch, workers: int,
                                                 max_bytes: int | None) -> None:
    """A disk error while a shard is written (say, a full disk) reaches the caller naming the
    shard; no shard after it is finished, and nothing is published or left staged."""
    import errno

    from shard_tools import hashing_file

    src, real, calls = vimh_source(n_train=600), hashing_file.write_all, []

    def failing(fd: int, data: bytes) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(hashing_file, "write_all", failing)
    with pytest.raises(OSError, match=r"cannot write .*/train-00000\d\.tar\.partial: No space left on device"):
        convert("vimh", src, tmp_path / "out", max_samples=50, max_bytes=max_bytes, workers=workers)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("mode", ["stream", "slices", "node"])
def test_a_write_failing_after_the_last_sample_cleans_up(tmp_path: Path, vimh_source, monkeypatch, mode: str) -> None:
    """The last write fails while the writer is already finishing: the error still reaches
    the caller, staging is removed (a node keeps only finished shards), no ``.partial`` is
    left, no descriptor stays open and the write-behind thread is gone."""
    import os
    import threading
    import time

    from shard_tools import hashing_file

    src, real, calls = vimh_source(n_train=300, n_test=4), hashing_file.write_all, []
    settings = {"stream": {"max_bytes": 10**9}, "slices": {"max_bytes": None},
                "node": {"max_bytes": None, "num_nodes": 2, "node_rank": 0}}[mode]

    def counted(fd: int, data: bytes) -> None:
        calls.append(1)
        if len(calls) == fail_at:
            time.sleep(0.05)  # the main thread is finishing by now
            raise OSError(28, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(hashing_file, "write_all", counted)
    fail_at = 0
    convert("vimh", src, tmp_path / "count", splits=["train"], max_samples=100, **settings)  # type: ignore[arg-type]
    fail_at, calls[:] = len(calls), []
    out = tmp_path / "out"
    with pytest.raises(OSError, match=r"cannot write .*\.tar\.partial: No space left on device"):
        convert("vimh", src, out, splits=["train"], max_samples=100, **settings)  # type: ignore[arg-type]
    left = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in left if p.suffix == ".partial"]
    assert not left if mode != "node" else all(p.name.endswith((".tar", ".jsonl")) for p in left)
    assert not [t for t in threading.enumerate() if t.name.startswith("write-behind")]
    assert not [fd for fd in os.listdir("/proc/self/fd") if str(out) in os.path.realpath(f"/proc/self/fd/{fd}")]


def test_a_failed_shard_file_is_closed_exactly_once(tmp_path: Path, monkeypatch) -> None:
    """Whether the write error surfaces at the last flush, at the close or at the wait,
    the descriptor is closed once: closing it again could close another file that got
    the same number."""
    import contextlib
    import os

    from shard_tools import hashing_file

    def failing(fd: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hashing_file, "write_all", failing)
    for _ in range(20):  # the thread's timing decides where the error surfaces
        writes = hashing_file.WriteBehind()
        shard = hashing_file.HashingFile(tmp_path / "a.partial", writes)
        with contextlib.suppress(OSError):
            shard.write(bytes(hashing_file.FLUSH_BYTES))
            shard.close(lambda sha: None)
        with contextlib.suppress(OSError):
            writes.wait()
        other = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT)  # likely the number just freed
        with contextlib.suppress(OSError):
            shard.discard()
            writes.wait()
        os.fstat(other)  # still open
        os.close(other)


def test_write_behind_stops_at_the_first_failure_and_still_closes(tmp_path: Path) -> None:
    from shard_tools.hashing_file import WriteBehind

    done: list[str] = []
    writes = WriteBehind(depth=2)

    def fail() -> None:
        raise OSError("first failure")

    writes.submit(done.append, "before")
    writes.submit(fail)
    with pytest.raises(OSError, match="first failure"):  # raised at a later submit, or at wait
        writes.submit(done.append, "skipped")
        writes.submit(done.append, "closed", always=True)
        writes.wait()
    writes.submit(done.append, "closed after", always=True)
    writes.wait()
    assert done[0] == "before" and done[-1] == "closed after" and "skipped" not in done


def test_failure_in_a_later_split_publishes_no_split(tmp_path: Path, vimh_source, monkeypatch) -> None:
    src = vimh_source()
    real = vimh.iter_blocks

    def failing(src, split, indices=None):
        for block in real(src, split, indices):
            if split == "test":
                yield SampleBlock(block.indices[:5], block.images[:5], block.labels[:5])
                raise ConversionError(f"{src}: sample {block.indices[5]}: simulated read failure")
            yield block

    monkeypatch.setattr(vimh, "iter_blocks", failing)
    with pytest.raises(ConversionError, match=r"simulated read failure"):
        convert("vimh", src, tmp_path / "out", max_samples=8)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


@given(st.integers(0, 4).flatmap(lambda n: st.lists(
    st.lists(st.integers(0, 255), min_size=n, max_size=n), min_size=1, max_size=30)), st.permutations(range(4)))
def test_label_lists_parse_alike_at_numpy_speed_and_one_by_one(values: list[list[int]], ids: list[int]) -> None:
    lists = [[len(row), *(x for pair in zip(ids[:len(row)], row, strict=True) for x in pair)] for row in values]
    fast = _parse_table(np.array(lists))
    assert fast is not None
    (fast_ids, fast_values), (slow_ids, slow_values) = fast, _parse_each(Path("f"), lists)
    assert fast_ids == slow_ids and fast_values.dtype == slow_values.dtype == np.uint8
    assert np.array_equal(fast_values, slow_values)


def test_block_checks_name_the_first_bad_sample() -> None:
    schema = DatasetSchema(name="w", split="train", image=ImageSpec(2, 2, 1),
                           heads=(Head(name="c", kind="class", num_classes=3), Head.quantized("q", 0, 1)))
    labels = np.array([[0, 0], [2, 255], [3, 0], [0, 256]])
    block = SampleBlock(np.array([10, 11, 12, 13]), np.zeros((4, 4), np.uint8), labels)
    with pytest.raises(ConversionError, match=r"^src: sample 12: head 'c' expected a value in 0..2, found 3$"):
        check_block(schema, block, "src")
    images = [bytes(4), bytes(4), bytes(4), bytes(3)]
    with pytest.raises(ConversionError, match=r"sample 13: image has 3 bytes, expected H\*W\*C = 4"):
        check_block(schema, SampleBlock(block.indices, images, labels * 0), "src")
    with pytest.raises(ConversionError, match=r"a block of 4 samples has 4 images and int64 labels of shape"):
        check_block(schema, SampleBlock(block.indices, images, labels[:, :1]), "src")


def test_label_columns_member_is_written_only_when_every_sample_has_labels(tmp_path: Path) -> None:
    import numpy as np

    from pipeline.format.label_columns import LABELS_MEMBER, decode_label_columns

    def row(c: int) -> tuple[dict, dict]:
        return {"c": np.array([c])}, {}

    with ShardWriter(tmp_path / "with", SCHEMA, max_samples=3) as w:
        for i in range(5):
            w.write(f"{i:04d}", [("raw", bytes(16)), ("labels.msgpack", LABELS)], row(i % 2))
    with tarfile.open(tmp_path / "with" / "train-000000.tar") as tar:
        names = tar.getnames()
        columns = tar.extractfile(LABELS_MEMBER).read()  # type: ignore[union-attr]
    assert names[-1] == LABELS_MEMBER and len(names) == 1 + 3 * 2 + 1
    classes, values = decode_label_columns(columns, SCHEMA, 3, "shard")
    assert classes["c"].tolist() == [0, 1, 0] and values == {}
    with ShardWriter(tmp_path / "mixed", SCHEMA) as w:
        w.write("a", [("raw", bytes(16)), ("labels.msgpack", LABELS)], row(1))
        w.write("b", [("raw", bytes(16)), ("labels.msgpack", LABELS)])
    with tarfile.open(tmp_path / "mixed" / "train-000000.tar") as tar:
        assert LABELS_MEMBER not in tar.getnames()


def test_write_copies_buffers_the_caller_may_reuse(tmp_path: Path) -> None:
    """Members are held until the next flush: a reused bytearray or a numpy array must be
    written as it was when ``write`` was called, with its byte length in the header."""
    schema = DatasetSchema(name="t", split="train", image=ImageSpec(None, None, 3, encoding="png"),
                           heads=(Head(name="c", kind="class", num_classes=3),))
    buffer = bytearray(1)
    with ShardWriter(tmp_path / "out", schema, max_samples=None, max_bytes=None) as writer:
        for i in range(3):
            buffer[0] = i
            writer.write(f"{i:08d}", [("png", buffer), ("values", np.arange(4, dtype=np.float32))])
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert [members[f"{i:08d}.png"] for i in range(3)] == [b"\0", b"\1", b"\2"]
    assert members["00000000.values"] == np.arange(4, dtype=np.float32).tobytes()
