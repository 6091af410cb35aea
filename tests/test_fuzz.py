"""Fuzzing the decoders of everything a shard set holds: any bytes end in a project error or
a correct result, quickly and in bounded memory. "Correct" is checked against independent
readers: ``tarfile`` for the tar walk, ``msgpack`` for labels, ``json`` for headers and
manifests; and the vectorized shard index against the header-by-header walk."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.errors import PipelineError
from pipeline.format import shard_index as tario
from pipeline.format.header import HEADER_MEMBER, header_bytes, parse_header_json, read_header_from
from pipeline.format.label_columns import LABELS_MEMBER, decode_label_columns
from pipeline.format.manifest import Manifest
from pipeline.format.schema import DatasetSchema
from pipeline.loading.decoded import decode_shard
from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))  # docs/reliability.md: the long run sets 3000
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
MEMORY_BOUND = 64 << 20  # bytes a decoder may allocate on top of its input


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, bytes]:
    """A real shard (raw pixels, __labels__ columns), its manifest and its header."""
    root = tmp_path_factory.mktemp("fuzz")
    src = generate_vimh(root / "vimh-4x4x1_f", n_train=12, n_test=2, height=4, width=4, channels=1)
    convert("vimh", src, root / "out", max_samples=12)
    shard = (root / "out" / "train" / "train-000000.tar").read_bytes()
    return {"shard": shard, "manifest": (root / "out" / "train" / "manifest.json").read_bytes(),
            "header": next(m for m in _tarfile_members(shard) if m[0] == HEADER_MEMBER)[1]}


@contextmanager
def bounded_memory() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
        assert peak < MEMORY_BOUND, f"{peak} bytes allocated"
    finally:
        tracemalloc.stop()


def ends_well(decode: Callable[[], object]) -> object | None:
    """``decode()``'s result, or None after a project error; any other exception fails."""
    with bounded_memory():
        try:
            return decode()
        except PipelineError:
            return None


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]


def mutated(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in edits:
        out[at % len(out)] = value
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6)


@FUZZ
@given(data=st.binary(max_size=4096))
@example(data=b"")
@example(data=bytes(1024))
def test_any_bytes_as_a_shard(data: bytes) -> None:
    ends_well(lambda: tario.index_shard(data, "fuzz.tar"))
    ends_well(lambda: tario.index_shard(data, "fuzz.tar", tolerant=True))


@FUZZ
@given(changes=edits)
def test_a_mutated_shard_reads_as_tarfile_reads_it(real, changes) -> None:
    """Where the loader's index accepts a mutated shard, every sample's members are what
    tarfile reads there, and the walk (header by header) gives the same index."""
    data = mutated(real["shard"], changes)
    index = ends_well(lambda: tario.index_shard(data, "fuzz.tar"))
    if index is None:
        return
    _assert_members_are_tarfiles(index, data)
    walked = _walk_only(data)
    assert walked.keys == index.keys  # type: ignore[attr-defined]


def _assert_members_are_tarfiles(index: tario.ShardIndex, data: bytes) -> None:
    """Every member the index gives is the bytes ``tarfile`` reads under that name."""
    reference = dict(_tarfile_members(data))
    for i, key in enumerate(index.keys):
        for ext in index.offsets:
            found = index.member(ext, i)
            if found is not None:
                assert bytes(found) == reference[f"{key}.{ext}"]


def _walk_only(data: bytes) -> tario.ShardIndex:
    """The index by the header-by-header walk alone (no uniform index, no array scan)."""
    uniform, scanned = tario.uniform_index, tario._scanned
    tario.uniform_index = lambda *args, **kwargs: None  # type: ignore[assignment]
    tario._scanned = lambda *args, **kwargs: False  # type: ignore[assignment]
    try:
        return tario.index_shard(data, "fuzz.tar")
    finally:
        tario.uniform_index, tario._scanned = uniform, scanned


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> bytes:
    """A shard whose samples vary in size (as JPEGs do), with __labels__ columns: indexed by
    the array scan (``pipeline.format.tar_scan``)."""
    from pipeline.format.labels import encode_labels
    from pipeline.format.schema import Head, ImageSpec
    from shard_tools.writer import ShardWriter

    root = tmp_path_factory.mktemp("varied")
    schema = DatasetSchema(name="varied", split="train", image=ImageSpec(None, None, 3, encoding="jpg", layout="HWC"),
                           heads=(Head(name="label", kind="class", num_classes=4),))
    with ShardWriter(root / "train", schema, max_samples=12) as writer:
        for i in range(12):
            writer.write(f"{i:04d}", [("jpg", bytes(range(7 * i + 1)) * (i + 1)),
                                      ("labels.msgpack", encode_labels({"label": {"class": i % 4}}))])
    return next((root / "train").glob("*.tar")).read_bytes()


def test_the_varied_shard_takes_the_array_scan(varied: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_scan = tario.scan_members
    monkeypatch.setattr(tario, "scan_members", lambda *a: calls.append(r := real_scan(*a)) or r)
    index = tario.index_shard(varied, "fuzz.tar")
    assert len(index) == 12 and calls and calls[0] is not None and index.stride is None
    walked = _walk_only(varied)
    assert walked.keys == index.keys and walked.labels_member == index.labels_member
    for ext in index.offsets:
        assert (walked.offsets[ext] == index.offsets[ext]).all() and (walked.sizes[ext] == index.sizes[ext]).all()


@FUZZ
@given(changes=edits)
def test_a_mutated_varied_shard_reads_as_tarfile_and_the_walk_read_it(varied: bytes, changes) -> None:
    data = mutated(varied, changes)
    index = ends_well(lambda: tario.index_shard(data, "fuzz.tar"))
    walked = ends_well(lambda: _walk_only(data))
    assert (index is None) == (walked is None)
    if index is None:
        return
    _assert_members_are_tarfiles(index, data)
    assert walked.keys == index.keys and walked.labels_member == index.labels_member  # type: ignore[attr-defined]


@FUZZ
@given(changes=edits)
def test_a_mutated_shard_decodes_or_fails_cleanly(real, changes) -> None:
    """Labels decoded from a mutated shard are in range for every sample not marked bad."""
    data = mutated(real["shard"], changes)
    schema = DatasetSchema.from_json(real["header"])
    index = ends_well(lambda: tario.index_shard(data, "fuzz.tar", tolerant=True))
    if index is None:
        return
    decoded = ends_well(lambda: decode_shard(index, schema))  # type: ignore[arg-type]
    if decoded is None:
        return
    good = [i for i in range(len(index)) if i not in decoded.problems]  # type: ignore[arg-type, attr-defined]
    for head in schema.heads:
        classes = decoded.classes[head.name][good]  # type: ignore[attr-defined]
        assert ((classes >= 0) & (classes < head.num_classes)).all()


@FUZZ
@given(data=st.binary(max_size=2048))
def test_any_bytes_as_a_header(data: bytes) -> None:
    ends_well(lambda: parse_header_json(data, "fuzz"))
    ends_well(lambda: read_header_from(io.BytesIO(data), "fuzz"))


@FUZZ
@given(changes=edits)
def test_a_mutated_header_parses_as_json_does(real, changes) -> None:
    data = mutated(real["header"], changes)
    schema = ends_well(lambda: parse_header_json(data, "fuzz"))
    if schema is not None:
        assert schema == DatasetSchema.from_dict(json.loads(data))  # type: ignore[comparison-overlap]
        assert header_bytes(schema) == header_bytes(DatasetSchema.from_json(header_bytes(schema)))  # type: ignore[arg-type]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=4), max_leaves=30)


@FUZZ
@given(value=json_values)
def test_any_json_as_a_manifest_or_schema(value: object) -> None:
    text = json.dumps(value)
    ends_well(lambda: Manifest.from_json(text, "fuzz"))
    ends_well(lambda: DatasetSchema.from_json(text, "fuzz"))


@FUZZ
@given(changes=edits, shard=st.fixed_dictionaries({"samples": json_values, "bytes": json_values,
                                                   "name": json_values, "sha256": json_values}))
def test_a_mutated_manifest_is_checked(real, changes, shard) -> None:
    manifest = json.loads(real["manifest"])
    manifest["shards"].append(shard)
    for text in (mutated(real["manifest"], changes), json.dumps(manifest).encode()):
        parsed = ends_well(lambda text=text: Manifest.from_json(text, "fuzz"))
        if parsed is not None:
            names = [s.name for s in parsed.shards]  # type: ignore[attr-defined]
            assert len(set(names)) == len(names)
            assert all(type(s.samples) is int and 0 <= s.samples <= s.bytes // 1024  # type: ignore[attr-defined]
                       for s in parsed.shards)  # type: ignore[attr-defined]


@FUZZ
@given(data=st.binary(max_size=1024), count=st.integers(0, 64))
def test_any_bytes_as_label_columns(real, data: bytes, count: int) -> None:
    schema = DatasetSchema.from_json(real["header"])
    columns = ends_well(lambda: decode_label_columns(data, schema, count, "fuzz"))
    if columns is not None:
        assert all(len(c) == count for c in columns[0].values())  # type: ignore[index]


label_values = st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=3), st.booleans(), st.none(),
                         st.binary(max_size=3))


@FUZZ
@given(classes=st.lists(label_values, min_size=12, max_size=12), value=label_values)
def test_any_label_values_are_checked(real, classes: list, value: object) -> None:
    """Label members with values of every type: a sample either decodes in range or is bad."""
    schema = DatasetSchema.from_json(real["header"])
    index = tario.index_shard(real["shard"], "fuzz.tar")
    records = [msgpack.unpackb(bytes(index.member("labels.msgpack", i))) for i in range(len(index))]
    blobs = []
    for record, cls in zip(records, classes, strict=True):
        head = schema.heads[0].name
        record[head] = {**record[head], "class": cls, "value": value}
        blobs.append(msgpack.packb(record))
    data = _shard_with_labels(real["shard"], index, blobs)
    decoded = ends_well(lambda: decode_shard(tario.index_shard(data, "fuzz.tar"), schema))
    assert decoded is not None
    for i, cls in enumerate(classes):
        ok = type(cls) is int and 0 <= cls < schema.heads[0].num_classes
        assert (i not in decoded.problems) == (ok and _value_ok(schema, value)), (cls, value)  # type: ignore[attr-defined]


def _value_ok(schema: DatasetSchema, value: object) -> bool:
    head = schema.heads[0]
    if head.kind != "quantized":
        return True
    slack = (head.max - head.min) * 1e-6  # type: ignore[operator]
    return type(value) in (int, float) and head.min - slack <= value <= head.max + slack  # type: ignore[operator]


def _shard_with_labels(shard: bytes, index: tario.ShardIndex, blobs: list[bytes]) -> bytes:
    """The shard rebuilt with these label members and no ``__labels__``."""
    from tests.crafted import end_of_archive, member

    parts = [member(HEADER_MEMBER, bytes(_header_of(shard)))]
    for i, key in enumerate(index.keys):
        parts += [member(f"{key}.raw", bytes(index.member("raw", i))), member(f"{key}.labels.msgpack", blobs[i])]
    return b"".join(parts) + end_of_archive()


def _header_of(shard: bytes) -> bytes:
    return next(data for name, data in _tarfile_members(shard) if name == HEADER_MEMBER)


def test_the_fuzzed_shard_takes_the_vectorized_path_with_label_columns(real) -> None:
    """So that mutations exercise the uniform index and the ``__labels__`` decoder too."""
    assert any(name == LABELS_MEMBER for name, _ in _tarfile_members(real["shard"]))
    assert tario.index_shard(real["shard"], "fuzz.tar").stride is not None


def test_the_long_run_named_here_is_the_one_the_docs_give() -> None:
    """The comment on EXAMPLES names the run docs/reliability.md gives (and says was run)."""
    named = re.search(r"docs/reliability.md: the long run sets (\d+)", Path(__file__).read_text())
    docs = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    assert named is not None
    assert set(re.findall(r"FUZZ_EXAMPLES=(\d+)", docs)) == {named.group(1)}
