"""The ``*_dataset_info.json`` layer that VIMH and CIFAR-100-MH share: the same keys
(``parameter_names``, ``parameter_mappings``, ``fixed_parameters``, image dimensions, sample
counts), read once into a :class:`DatasetInfo`, and how a parameter becomes a head name."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConversionError
from pipeline.format.bounded_json import load_json
from pipeline.format.schema import FixedParameter

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
_JSON_DIMS = re.compile(r"^(\d+)x(\d+)x(\d+)$")
Dims = tuple[int, int, int]


@dataclass(frozen=True)
class DatasetInfo:
    """What a ``*_dataset_info.json`` says, normalized across VIMH's versions (1.0, 2.x, 3.0)."""

    path: Path | None
    version: str = ""
    dataset_name: str = ""
    dims: Dims | None = None
    parameter_names: tuple[str, ...] = ()
    mappings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    fixed: tuple[FixedParameter, ...] = ()
    counts: Mapping[str, int] = field(default_factory=dict)
    header_hint: int | None = None


MAX_INFO_BYTES = 64 << 20


def read_dataset_info(src: Path, filename: str) -> DatasetInfo:
    """``src/filename`` (VIMH's JSON, or a format's that shares its keys), normalized; a
    missing file gives the defaults (with a warning)."""
    path = src / filename
    if not path.exists():
        log.warning("%s: missing; using defaults (heads named param_<id>, range 0..1, 256 "
                    "classes; image dimensions from the directory name and data)", path)
        return DatasetInfo(path=None)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConversionError(f"{path}: cannot be read ({e})") from e
    info = load_json(text, where=str(path), error=ConversionError, max_bytes=MAX_INFO_BYTES)
    if not isinstance(info, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(info).__name__}")
    return DatasetInfo(
        path=path, version=str(info.get("version", "")),
        dataset_name=str(info.get("dataset_name", "")), dims=_json_dims(path, info),
        parameter_names=tuple(str(n) for n in info.get("parameter_names", [])),
        mappings=_dict_field(path, info, "parameter_mappings"),
        fixed=tuple(_fixed(k, v) for k, v in _dict_field(path, info, "fixed_parameters").items()),
        counts={s: int(info[k]) for s in SPLITS for k in (f"{s}_samples", f"num_{s}_samples")
                if isinstance(info.get(k), int)},
        header_hint=_header_hint(info.get("label_encoding")))


def _dict_field(path: Path, info: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = info.get(key) or {}
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: {key} expected an object, found {type(value).__name__}")
    return value


def _json_dims(path: Path, info: Mapping[str, Any]) -> Dims | None:
    if all(isinstance(info.get(k), int) for k in ("height", "width", "channels")):
        return (info["height"], info["width"], info["channels"])
    match = _JSON_DIMS.match(str(info.get("image_size", "")))
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def _header_hint(encoding: Any) -> int | None:
    """Record header size the JSON declares: 14 (dims + scale factors) or 6 (dims only)."""
    size = encoding.get("metadata_bytes") if isinstance(encoding, dict) else None
    return {14: 14, 6: 6, 3: 6}.get(size) if isinstance(size, int) else None


def _fixed(name: str, value: Any) -> FixedParameter:
    if isinstance(value, dict) and "value" in value:
        return FixedParameter(name, value["value"], str(value.get("description", "")))
    return FixedParameter(name, value)


def head_name(meta: DatasetInfo, param_id: int, path: Path) -> tuple[str, str]:
    """Parameter ``param_id``'s name in the source and the head name made from it
    (``param_<id>`` beyond ``parameter_names``, ``_`` for non-identifier characters)."""
    if param_id < len(meta.parameter_names):
        raw_name = meta.parameter_names[param_id]
    else:
        raw_name = f"param_{param_id}"
        log.warning("%s: parameter id %d is beyond parameter_names %s; naming it %s",
                    path, param_id, list(meta.parameter_names), raw_name)
    name = re.sub(r"\W", "_", raw_name)
    if name != raw_name:
        log.warning("%s: parameter name %r is not an identifier; the head is named %r", path, raw_name, name)
    return raw_name, name


def head_description(raw_name: str, name: str, mapping: Mapping[str, Any]) -> str:
    """The mapping's description, or the source name; the source name is kept in it when
    the head was renamed."""
    description = str(mapping.get("description", "")) or raw_name
    return description if name == raw_name or raw_name in description else f"{raw_name}: {description}"


