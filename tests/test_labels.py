"""Label members: encoding round trip (hypothesis) and the range checks."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import ShardFormatError
from pipeline.labels import decode_labels, encode_labels, label_problems, label_record
from pipeline.schema import DatasetSchema, Head, ImageSpec

SCHEMA = DatasetSchema(name="d", split="train", image=ImageSpec(4, 4, 1), heads=(
    Head.quantized("pitch", 40, 88, 4), Head.quantized("fine", -1, 1),
    Head(name="kind", kind="class", num_classes=5)))


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 4))
def test_label_round_trip(pitch: int, fine: int, kind: int) -> None:
    record = label_record(SCHEMA, {"pitch": pitch, "fine": fine, "kind": kind})
    decoded = decode_labels(encode_labels(record))
    assert decoded == record
    assert label_problems(SCHEMA, decoded) == []
    assert decoded["pitch"]["q"] == pitch and decoded["kind"] == {"class": kind}
    assert decoded["fine"]["value"] == -1 + fine / 255 * 2
    assert decoded["fine"]["class"] == fine


def test_problems_are_each_named() -> None:
    record = label_record(SCHEMA, {"pitch": 10, "fine": 3, "kind": 1})
    record["pitch"] = {"class": 5, "q": 10, "value": 40 + 10 / 255 * 48}
    record["fine"] = {"class": 3, "q": 300, "value": 0.0}
    record["kind"] = {"class": 5}
    record["extra"] = {"class": 0}
    problems = label_problems(SCHEMA, record)
    assert problems == [
        "unknown head 'extra'",
        "head 'pitch': class expected 0 for q=10, found 5",
        "head 'fine': q expected in 0..255, found 300",
        "head 'kind': class expected in 0..4, found 5",
    ]
    del record["kind"]
    assert "head 'kind': expected a map with 'class', found None" in label_problems(SCHEMA, record)


def test_value_must_match_q() -> None:
    record = label_record(SCHEMA, {"pitch": 10, "fine": 3, "kind": 1})
    record["pitch"] = {**record["pitch"], "value": 99.0}
    assert label_problems(SCHEMA, record) == [
        "head 'pitch': value expected 41.88235294117647 for q=10 (range 40.0..88.0), found 99.0"]


@pytest.mark.parametrize(("data", "message"), [
    (b"\xc1", r"labels: expected a msgpack map, found undecodable bytes"),
    (msgpack.packb([1, 2]), r"labels: expected a msgpack map, found list"),
])
def test_undecodable_labels(data: bytes, message: str) -> None:
    with pytest.raises(ShardFormatError, match=message):
        decode_labels(data, "labels")
