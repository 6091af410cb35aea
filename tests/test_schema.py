"""The schema object: JSON round trip (hypothesis), the quantization rule, and each error."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import SchemaError
from pipeline.format.schema import DatasetSchema, FixedParameter, Head, ImageSpec, Provenance

names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,15}", fullmatch=True)
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def quantized_heads(draw, name: str) -> Head:
    lo = draw(finite)
    hi = lo + draw(st.floats(min_value=1e-3, max_value=1e6))
    step = draw(st.none() | st.floats(min_value=(hi - lo) / 255, max_value=hi - lo))
    return Head.quantized(name, lo, hi, step, source_id=draw(st.integers(0, 255)),
                          description=draw(st.text(max_size=20)))


@st.composite
def class_heads(draw, name: str) -> Head:
    n = draw(st.integers(1, 50))
    labels = draw(st.none() | st.lists(st.text(max_size=8), min_size=n, max_size=n))
    return Head(name=name, kind="class", num_classes=n, class_names=tuple(labels or ()))


@st.composite
def schemas(draw) -> DatasetSchema:
    head_names = draw(st.lists(names, min_size=1, max_size=5, unique=True))
    heads = tuple(draw(st.one_of(quantized_heads(n), class_heads(n))) for n in head_names)
    encoding = draw(st.sampled_from(["raw", "png", "jpg"]))
    image = ImageSpec(height=draw(st.integers(1, 512)), width=draw(st.integers(1, 512)),
                      channels=draw(st.sampled_from([1, 3])), encoding=encoding,
                      layout="CHW" if encoding == "raw" else "HWC")
    fixed = tuple(FixedParameter(n, draw(st.integers() | st.text(max_size=5)), "d")
                  for n in draw(st.lists(names, max_size=3, unique=True)))
    return DatasetSchema(name=draw(st.text(min_size=1, max_size=30)), split=draw(names),
                         image=image, heads=heads, fixed_parameters=fixed,
                         provenance=Provenance("vimh-pickle", "2.1", "src", "0.1.0"))


@given(schemas())
def test_json_round_trip_is_exact_and_canonical(schema: DatasetSchema) -> None:
    text = schema.to_json()
    again = DatasetSchema.from_json(text)
    assert again == schema
    assert again.to_json() == text


@given(quantized_heads("h"), st.integers(0, 255))
def test_quantized_class_is_the_step_nearest_the_real_value(head: Head, q: int) -> None:
    cls = head.class_of_quantized(q)
    assert 0 <= cls < head.num_classes
    if head.step is None:
        assert cls == q and head.num_classes == 256
    else:
        assert abs(head.min + cls * head.step - head.real_value(q)) <= head.step / 2 + 1e-6 * head.step \
            or cls in (0, head.num_classes - 1)
        assert cls <= head.class_of_quantized(min(q + 1, 255))


def test_quantization_rule_examples() -> None:
    head = Head.quantized("note_number", 40, 88, 4)
    assert head.num_classes == 13
    assert (head.real_value(0), head.real_value(255)) == (40.0, 88.0)
    assert [head.class_of_quantized(q) for q in (0, 10, 11, 127, 255)] == [0, 0, 1, 6, 12]
    assert Head.quantized("x", 0, 1).num_classes == 256


def _dict(**changes) -> dict:
    schema = DatasetSchema(name="d", split="train", image=ImageSpec(8, 8, 3),
                           heads=(Head.quantized("a", 0, 1, 0.25),))
    d = schema.to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize(("data", "message"), [
    ("{not json", r"schema: expected JSON, found unparsable text"),
    (json.dumps(_dict(format="other")), r"schema.format: expected 'multihead-shards', found 'other'"),
    (json.dumps(_dict(format_version="2.0")), r"format_version: expected 1.x \(this reader\), found '2.0'"),
    (json.dumps({k: v for k, v in _dict().items() if k != "image"}), r"schema.image: missing"),
    (json.dumps(_dict(heads=[])), r"heads: expected at least one head, found 0"),
    (json.dumps(_dict(heads=[{**_dict()["heads"][0], "num_classes": 7}])),
     r"head 'a'.num_classes: expected 5 \(from min, max and step\), found 7"),
    (json.dumps(_dict(heads=[_dict()["heads"][0]] * 2)), r"heads: expected unique head names, found \['a'\]"),
    (json.dumps(_dict(image={**_dict()["image"], "encoding": "webp"})),
     r"image.encoding: expected raw \| png \| jpg, found 'webp'"),
    (json.dumps(_dict(image={**_dict()["image"], "height": "8"})), r"image.height: expected int or null, found '8'"),
    (json.dumps(_dict(heads=[{**_dict()["heads"][0], "name": "has space"}])), r"head.name: expected an identifier"),
    (json.dumps(_dict(heads=[{**_dict()["heads"][0], "max": -1.0}])), r"head 'a'.max: expected a finite number > min"),
])
def test_invalid_schemas_are_rejected_clearly(data: str, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        DatasetSchema.from_json(data)


def test_head_lookup_names_the_heads() -> None:
    schema = DatasetSchema.from_dict(_dict())
    assert schema.head("a").num_classes == 5
    with pytest.raises(SchemaError, match=r"dataset 'd' has no head 'b'; heads: \['a'\]"):
        schema.head("b")
