"""The one schema object: dataset, image spec and label heads, as frozen dataclasses.

A :class:`DatasetSchema` is built by a converter, written into every shard's header,
read back by the loader and handed to the datamodule and model. Its JSON form is the
normative header payload described in ``docs/shard-format.md``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.errors import SchemaError, quoted
from pipeline.format.bounded_json import load_json

FORMAT_NAME = "multihead-shards"
FORMAT_VERSION = "1.1"
ENCODINGS = ("raw", "png", "jpg")
LAYOUTS = ("CHW", "HWC")
HEAD_KINDS = ("class", "quantized")
QUANTIZATION_LEVELS = 256
MAX_SIDE = 65535  # pixels per image side (JPEG's own limit)
MAX_CHANNELS = 4096
MAX_CLASSES = 1 << 20  # per head: a model's output layer is sized by it
MAX_HEADER_BYTES = 8 << 20  # the schema's JSON
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def _require(ok: bool, where: str, expected: object, found: object) -> None:
    if not ok:
        raise SchemaError(f"{where}: expected {expected}, found {quoted(found)}")


def _get(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise SchemaError(f"{where}.{key}: missing (expected {_kind_name(kind)})")
    value = d[key]
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    _require(ok, f"{where}.{key}", _kind_name(kind), value)
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def quantized_num_classes(minimum: float, maximum: float, step: float | None) -> int:
    """Classes of a quantized head: ``round((max-min)/step)+1`` when step > 0, else 256."""
    if step is None or not step > 0:
        return QUANTIZATION_LEVELS
    return round((maximum - minimum) / step) + 1


@dataclass(frozen=True)
class ImageSpec:
    """Shape and storage of every image of a dataset (pixels are uint8). ``height`` and
    ``width`` are None when encoded (png/jpg) images vary in size."""

    height: int | None
    width: int | None
    channels: int
    encoding: str = "raw"
    layout: str = "CHW"

    def __post_init__(self) -> None:
        sizes = (self.height, self.width)
        _require(sizes == (None, None) or all(_is_int(v) and 1 <= v <= MAX_SIDE for v in sizes),  # type: ignore[operator]
                 "image.height/width", f"ints in 1..{MAX_SIDE}, or both null (sizes vary)", sizes)
        _require(self.fixed_size or self.encoding != "raw", "image.height/width", "fixed sizes for raw images",
                 sizes)
        _require(_is_int(self.channels) and 1 <= self.channels <= MAX_CHANNELS, "image.channels",
                 f"an int in 1..{MAX_CHANNELS}", self.channels)
        _require(self.channels in (1, 3, 4) or self.encoding == "raw",
                 "image.channels", "1, 3 or 4 for encoded images", self.channels)
        _require(self.encoding in ENCODINGS, "image.encoding", " | ".join(ENCODINGS), self.encoding)
        _require(self.layout in LAYOUTS, "image.layout", " | ".join(LAYOUTS), self.layout)

    @property
    def fixed_size(self) -> bool:
        return self.height is not None and self.width is not None

    @property
    def nbytes(self) -> int:
        """Size of one decoded image in bytes (fixed-size images only)."""
        c, h, w = self.shape_chw
        return c * h * w

    @property
    def shape_chw(self) -> tuple[int, int, int]:
        if self.height is None or self.width is None:
            raise SchemaError(f"image sizes vary ({self.describe()}): there is no one shape")
        return (self.channels, self.height, self.width)

    def describe(self) -> str:
        size = f"{self.height}x{self.width}" if self.fixed_size else "(varying)"
        return f"{size}x{self.channels} {self.encoding} {self.layout}"


@dataclass(frozen=True)
class Head:
    """One label head. ``class`` heads store a class index; ``quantized`` heads store a
    byte ``q`` in 0..levels-1 that maps to a real value in [min, max] and to a class."""

    name: str
    kind: str
    num_classes: int
    source_id: int | None = None
    description: str = ""
    min: float | None = None
    max: float | None = None
    step: float | None = None
    levels: int | None = None
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f"head {self.name!r}"
        _require(isinstance(self.name, str) and bool(_NAME_RE.match(self.name)),
                 "head.name", "an identifier ([A-Za-z][A-Za-z0-9_]*)", self.name)
        _require(self.kind in HEAD_KINDS, f"{where}.kind", " | ".join(HEAD_KINDS), self.kind)
        _require(_is_int(self.num_classes) and 1 <= self.num_classes <= MAX_CLASSES,
                 f"{where}.num_classes", f"an int in 1..{MAX_CLASSES}", self.num_classes)
        _require(not self.class_names or len(self.class_names) == self.num_classes,
                 f"{where}.class_names", f"{self.num_classes} names", len(self.class_names))
        if self.kind == "quantized":
            self._check_quantized(where)

    def _check_quantized(self, where: str) -> None:
        lo, hi = self.min, self.max
        _require(isinstance(lo, (int, float)) and math.isfinite(lo), f"{where}.min", "a finite number", lo)
        _require(isinstance(hi, (int, float)) and math.isfinite(hi) and hi > lo  # type: ignore[operator]
                 and math.isfinite(hi - lo), f"{where}.max", f"a finite number > min ({lo}), max - min finite",  # type: ignore[operator]
                 hi)
        step = self.step
        _require(step is None or (isinstance(step, (int, float)) and math.isfinite(step) and step > 0),
                 f"{where}.step", "a finite number > 0, or null", step)
        _require(self.levels == QUANTIZATION_LEVELS, f"{where}.levels", QUANTIZATION_LEVELS, self.levels)
        expected = quantized_num_classes(lo, hi, self.step)  # type: ignore[arg-type]
        _require(self.num_classes == expected, f"{where}.num_classes",
                 f"{expected} (from min, max and step)", self.num_classes)

    @classmethod
    def quantized(cls, name: str, minimum: float, maximum: float, step: float | None = None,
                  **kwargs: Any) -> Head:
        """A quantized head whose class count follows from min, max and step."""
        step = step if step is not None and step > 0 else None
        return cls(name=name, kind="quantized", min=float(minimum), max=float(maximum),
                   step=None if step is None else float(step), levels=QUANTIZATION_LEVELS,
                   num_classes=quantized_num_classes(minimum, maximum, step), **kwargs)

    def real_value(self, q: int) -> float:
        """Real value of quantized byte ``q``: ``min + q/(levels-1) * (max-min)``."""
        lo, hi = self._range()
        return lo + q / (QUANTIZATION_LEVELS - 1) * (hi - lo)

    def class_of_quantized(self, q: int) -> int:
        """Class index of quantized byte ``q``: the nearest step to its real value."""
        if self.step is None:
            return q
        lo, _ = self._range()
        index = math.floor((self.real_value(q) - lo) / self.step + 0.5)
        return min(max(index, 0), self.num_classes - 1)

    def _range(self) -> tuple[float, float]:
        if self.kind != "quantized" or self.min is None or self.max is None:
            raise SchemaError(f"head {self.name!r} is a {self.kind} head, not quantized")
        return self.min, self.max

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "num_classes": self.num_classes,
                             "source_id": self.source_id, "description": self.description}
        if self.kind == "quantized":
            d.update(min=self.min, max=self.max, step=self.step, levels=self.levels)
        if self.class_names:
            d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "head") -> Head:
        _require(isinstance(d, Mapping), where, "an object", d)
        kind = _get(d, "kind", str, where)
        extra: dict[str, Any] = {}
        if kind == "quantized":
            extra = {"min": _finite(_get(d, "min", (int, float), where), f"{where}.min"),
                     "max": _finite(_get(d, "max", (int, float), where), f"{where}.max"),
                     "step": _optional_float(d.get("step"), f"{where}.step"),
                     "levels": _get(d, "levels", int, where)}
        names = d.get("class_names") or ()
        _require(isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names),
                 f"{where}.class_names", "a list of strings", names)
        source_id = d.get("source_id")
        _require(source_id is None or (isinstance(source_id, int) and not isinstance(source_id, bool)),
                 f"{where}.source_id", "int or null", source_id)
        return cls(name=_get(d, "name", str, where), kind=kind,
                   num_classes=_get(d, "num_classes", int, where), source_id=source_id,
                   description=str(d.get("description", "")), class_names=tuple(names), **extra)


def _finite(value: int | float, where: str) -> float:
    """``value`` as a finite float (a JSON integer too large for a float is an error)."""
    try:
        number = float(value)
    except OverflowError as e:
        raise SchemaError(f"{where}: expected a finite number, found an integer of {len(str(value))} digits") from e
    _require(math.isfinite(number), where, "a finite number", value)
    return number


def _optional_float(value: Any, where: str) -> float | None:
    _require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
             where, "a number or null", value)
    return None if value is None else _finite(value, where)


@dataclass(frozen=True)
class FixedParameter:
    """A generation parameter that did not vary across the dataset (kept for provenance)."""

    name: str
    value: Any
    description: str = ""


@dataclass(frozen=True)
class Provenance:
    """Where a shard set came from: the source format and the converter that wrote it."""

    source_format: str
    source_version: str = ""
    source_name: str = ""
    converter_version: str = ""


@dataclass(frozen=True)
class DatasetSchema:
    """A dataset split: its name, image spec, label heads, fixed parameters, provenance."""

    name: str
    split: str
    image: ImageSpec
    heads: tuple[Head, ...]
    fixed_parameters: tuple[FixedParameter, ...] = ()
    provenance: Provenance = field(default_factory=lambda: Provenance(source_format="unknown"))
    format_version: str = FORMAT_VERSION

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and bool(self.name), "name", "a non-empty string", self.name)
        _require(isinstance(self.split, str) and bool(_NAME_RE.match(self.split)),
                 "split", "an identifier such as 'train'", self.split)
        _require(len(self.heads) >= 1, "heads", "at least one head", len(self.heads))
        names = [h.name for h in self.heads]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _require(not dupes, "heads", "unique head names", dupes)
        # canonical order, as the JSON (an object with sorted keys) holds them
        object.__setattr__(self, "fixed_parameters",
                           tuple(sorted(self.fixed_parameters, key=lambda f: f.name)))
        major = str(self.format_version).split(".")[0]
        _require(major == FORMAT_VERSION.split(".")[0], "format_version",
                 f"{FORMAT_VERSION.split('.')[0]}.x (this reader)", self.format_version)

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.heads)

    def head(self, name: str) -> Head:
        for h in self.heads:
            if h.name == name:
                return h
        raise SchemaError(f"dataset {self.name!r} has no head {name!r}; heads: {list(self.head_names)}")

    def with_split(self, split: str) -> DatasetSchema:
        return replace(self, split=split)

    def to_dict(self) -> dict[str, Any]:
        p = self.provenance
        return {
            "format": FORMAT_NAME, "format_version": self.format_version,
            "name": self.name, "split": self.split,
            "image": {"height": self.image.height, "width": self.image.width,
                      "channels": self.image.channels, "encoding": self.image.encoding,
                      "layout": self.image.layout, "dtype": "uint8"},
            "heads": [h.to_dict() for h in self.heads],
            "fixed_parameters": {f.name: {"value": f.value, "description": f.description}
                                 for f in self.fixed_parameters},
            "provenance": {"source_format": p.source_format, "source_version": p.source_version,
                           "source_name": p.source_name, "converter_version": p.converter_version},
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, so equal schemas give equal bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "schema") -> DatasetSchema:
        data = load_json(text, where=where, error=SchemaError, max_bytes=MAX_HEADER_BYTES)
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "schema") -> DatasetSchema:
        _require(isinstance(d, Mapping), where, "a JSON object", type(d).__name__)
        _require(d.get("format") == FORMAT_NAME, f"{where}.format", repr(FORMAT_NAME), d.get("format"))
        image = _get(d, "image", Mapping, where)
        heads = _get(d, "heads", list, where)
        fixed = d.get("fixed_parameters") or {}
        _require(isinstance(fixed, Mapping), f"{where}.fixed_parameters", "an object", fixed)
        prov = d.get("provenance") or {}
        _require(isinstance(prov, Mapping), f"{where}.provenance", "an object", prov)
        return cls(
            name=_get(d, "name", str, where), split=_get(d, "split", str, where),
            image=ImageSpec(height=_get(image, "height", (int, type(None)), f"{where}.image"),
                            width=_get(image, "width", (int, type(None)), f"{where}.image"),
                            channels=_get(image, "channels", int, f"{where}.image"),
                            encoding=_get(image, "encoding", str, f"{where}.image"),
                            layout=_get(image, "layout", str, f"{where}.image")),
            heads=tuple(Head.from_dict(h, f"{where}.heads[{i}]") for i, h in enumerate(heads)),
            fixed_parameters=tuple(_fixed_from_json(k, v) for k, v in fixed.items()),
            provenance=Provenance(**{k: str(prov.get(k, "")) for k in
                                     ("source_format", "source_version", "source_name",
                                      "converter_version")}),
            format_version=_get(d, "format_version", str, where),
        )


def _fixed_from_json(name: str, value: Any) -> FixedParameter:
    if isinstance(value, Mapping) and "value" in value:
        return FixedParameter(name, value["value"], str(value.get("description", "")))
    return FixedParameter(name, value)



def head_signature(head: Head) -> tuple[object, ...]:
    """What makes two heads the same head: name, kind, classes, the real values of a
    quantized head's classes, and the class names (the meaning of each class index).
    Descriptions and source ids are notes, not part of it."""
    return (head.name, head.kind, head.num_classes, head.min, head.max, head.step, head.class_names)


def same_heads(a: DatasetSchema, b: DatasetSchema) -> bool:
    """Whether two schemas have the same heads in the same order: the one definition
    (a model trained on one can read the other's labels)."""
    return [head_signature(h) for h in a.heads] == [head_signature(h) for h in b.heads]


def check_same_heads(expected: DatasetSchema, found: DatasetSchema, what: str, expected_what: str = "the data") -> None:
    """SchemaError naming ``what`` and every head that differs, unless :func:`same_heads`."""
    if same_heads(expected, found):
        return
    ours, theirs = {h.name: h for h in expected.heads}, {h.name: h for h in found.heads}
    differ = [f"{name}: {_head_summary(ours.get(name))} vs {_head_summary(theirs.get(name))}"
              for name in dict.fromkeys([*ours, *theirs])
              if name not in ours or name not in theirs or head_signature(ours[name]) != head_signature(theirs[name])]
    order = "" if differ else " (the same heads in another order)"
    raise SchemaError(f"{what}: heads {list(found.head_names)} differ from {expected_what}'s "
                      f"{list(expected.head_names)}{order}: {'; '.join(differ)[:1000]}")


def _head_summary(head: Head | None) -> str:
    if head is None:
        return "absent"
    if head.kind == "quantized":
        return f"quantized {head.num_classes} classes over {head.min}..{head.max} step {head.step}"
    named = f", names {list(head.class_names)[:3]}..." if head.class_names else ""
    return f"class, {head.num_classes} classes{named}"
