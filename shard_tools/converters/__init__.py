"""Source formats. Each module implements the :class:`SourceFormat` functions; the shared
driver in :mod:`shard_tools.convert` and the one writer do everything else."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipeline.errors import ConversionError
from pipeline.schema import DatasetSchema


@dataclass(frozen=True)
class SourceSample:
    """One sample as read from a source: its index in the source split, the image bytes
    as the schema's image spec stores them, and each head's raw value (the class index,
    or the quantized byte for quantized heads)."""

    index: int
    image: bytes
    labels: dict[str, int]
    extra: Mapping[str, object] | None = None


class SourceFormat(Protocol):
    """What a converter module provides."""

    NAME: str

    def splits(self, src: Path) -> tuple[str, ...]:
        """The splits present in ``src``, in conversion order."""

    def read_schema(self, src: Path, split: str) -> DatasetSchema:
        """The schema of ``split``; raises ConversionError on inconsistent input."""

    def count_samples(self, src: Path, split: str) -> int: ...

    def iter_samples(self, src: Path, split: str,
                     indices: Sequence[int] | None = None) -> Iterator[SourceSample]:
        """Samples at ``indices`` (all, in source order, when None)."""


def get_format(name: str) -> SourceFormat:
    """The converter module registered under ``name``."""
    from shard_tools.converters import vimh

    formats: dict[str, SourceFormat] = {"vimh": vimh}
    if name not in formats:
        raise ConversionError(f"unknown source format {name!r}; expected one of {sorted(formats)}")
    return formats[name]
