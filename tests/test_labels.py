"""Label members: encoding round trip (hypothesis) and the range checks."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.errors import ShardFormatError
from pipeline.format.labels import (
    EXTRA_KEY,
    MAX_TABLE,
    LabelEncoder,
    decode_labels,
    encode_labels,
    label_problems,
    label_record,
)
from pipeline.format.schema import MAX_CLASSES, DatasetSchema, Head, ImageSpec, quantized_num_classes

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


@st.composite
def heads(draw: st.DrawFn, index: int) -> Head:
    name = draw(st.sampled_from(["pitch", "x", "a_rather_long_head_name_of_thirty_two"])) + f"_{index}"
    if draw(st.booleans()):
        return Head(name=name, kind="class", num_classes=draw(st.sampled_from([1, 5, 200, 70_000])))
    low = draw(st.floats(-1e6, 1e6))
    high = low + draw(st.floats(1e-3, 1e6))
    step = draw(st.one_of(st.none(), st.floats(1e-2, 1e5)))
    assume(quantized_num_classes(low, high, step) <= MAX_CLASSES)  # a head's class count is bounded
    return Head.quantized(name, low, high, step)


@st.composite
def batches(draw: st.DrawFn) -> tuple[DatasetSchema, np.ndarray, dict[str, np.ndarray]]:
    n_heads, n = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    schema = DatasetSchema(name="d", split="train", image=ImageSpec(4, 4, 1),
                           heads=tuple(draw(heads(i)) for i in range(n_heads)))
    values = np.array([[draw(st.integers(0, (255 if h.kind == "quantized" else h.num_classes - 1)))
                        for h in schema.heads] for _ in range(n)], dtype=np.int64)
    floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
    extra: dict[str, np.ndarray] = {}
    if draw(st.booleans()):
        extra["scale_factors"] = np.array(draw(st.lists(st.tuples(floats32, floats32), min_size=n,
                                                        max_size=n)), dtype=np.float32).reshape(n, 2)
    if draw(st.booleans()):
        extra["gain"] = np.array(draw(st.lists(st.floats(), min_size=n, max_size=n)), dtype=np.float64)
    return schema, values, extra


@settings(max_examples=150, deadline=None)
@given(batches())
def test_label_encoder_equals_msgpack_of_label_record(batch: tuple[DatasetSchema, np.ndarray, dict]) -> None:
    """The table-built bytes equal msgpack.packb(record) for any heads, q values and floats."""
    schema, values, extra = batch
    rows, lengths = LabelEncoder(schema).encode(values, extra)
    for i, row in enumerate(values):
        record: dict = label_record(schema, dict(zip(schema.head_names, row.tolist(), strict=True)))
        if extra:
            record[EXTRA_KEY] = {name: column[i].tolist() for name, column in extra.items()}
        assert rows[i, :lengths[i]].tobytes() == msgpack.packb(record, use_bin_type=True) == encode_labels(record)
        assert not rows[i, lengths[i]:].any()


def test_label_encoder_handles_heads_too_large_to_table() -> None:
    schema = DatasetSchema(name="d", split="train", image=ImageSpec(4, 4, 1),
                           heads=(Head(name="big", kind="class", num_classes=MAX_TABLE * 4),))
    values = np.array([[0], [MAX_TABLE * 4 - 1], [MAX_TABLE], [0]])
    rows, lengths = LabelEncoder(schema).encode(values)
    assert [decode_labels(rows[i, :lengths[i]].tobytes())["big"]["class"] for i in range(4)] == \
        [0, MAX_TABLE * 4 - 1, MAX_TABLE, 0]
