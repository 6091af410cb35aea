"""The source formats: one folder each (reader, synthetic generator, class lists, command-line
options), and this registry. Adding a format is one folder and one line here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.errors import ConversionError
from shard_tools.formats import cifar100mh, imagenet100, vimh, webdataset
from shard_tools.formats.base import FormatEntry, Generator, SampleBlock, SourceFormat

FORMATS: dict[str, FormatEntry] = {entry.name: entry for entry in (
    vimh.FORMAT, cifar100mh.FORMAT, imagenet100.FORMAT, webdataset.FORMAT)}

__all__ = ["FORMATS", "FormatEntry", "Generator", "SampleBlock", "SourceFormat", "generators", "get_format"]


def get_format(name: str, options: Mapping[str, Any] | None = None) -> SourceFormat:
    """The format registered under ``name``, configured with ``options``."""
    if name not in FORMATS:
        raise ConversionError(f"unknown source format {name!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[name].format(options)


def generators() -> dict[str, Generator]:
    """Every synthetic source any format can write, by name."""
    return {g.name: g for entry in FORMATS.values() for g in entry.generators}
