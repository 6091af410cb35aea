"""Source formats. Each module implements the :class:`SourceFormat` functions; the shared
driver in :mod:`shard_tools.convert` and the one writer do everything else."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.errors import ConversionError
from pipeline.schema import DatasetSchema

BLOCK_BYTES = 1 << 20  # converters yield blocks of about this many image bytes


@dataclass(frozen=True)
class SampleBlock:
    """Consecutive samples in write order, as columns.

    - ``indices``: ``(n,)`` ints, each sample's index in the source split (its key).
    - ``images``: the image bytes as the schema's image spec stores them: an ``(n, nbytes)``
      uint8 array when every image has the same size (raw pixels), else ``n`` bytes objects.
    - ``labels``: ``(n, len(schema.heads))`` ints, column ``j`` the raw value of head ``j``
      in schema order (the class index, or the quantized byte of a quantized head).
    - ``extra``: per-sample source metadata for the label record's ``_extra`` map: name to
      an ``(n,)`` or ``(n, k)`` array, stored per sample as a float or a list of floats.
    - ``requested``: when the format skipped some of the indices it was asked for (bad
      files), how many indices the block covers, skipped ones included.
    """

    indices: np.ndarray
    images: np.ndarray | Sequence[bytes]
    labels: np.ndarray
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)
    requested: int | None = None  # indices asked for that this block covers, skipped ones included

    @property
    def covered(self) -> int:
        """How many of the requested indices this block accounts for (for progress)."""
        return len(self) if self.requested is None else self.requested

    def __len__(self) -> int:
        return len(self.indices)


def blocks_of(indices: Sequence[int] | np.ndarray, size: int) -> Iterator[np.ndarray]:
    """``indices`` as consecutive int64 arrays of ``size`` entries (the last may be shorter)."""
    order = np.asarray(indices, dtype=np.int64)
    step = max(1, size)
    for start in range(0, len(order), step):
        yield order[start:start + step]


class SourceFormat(Protocol):
    """What a converter module provides.

    Options: a format that takes options (``imagenet100``: class list, resize, ...) also
    has a module-level ``configure(**options)`` that returns the format with those options
    set, an object with these same members; :func:`get_format` calls it when options are
    given and refuses options for a format without it. The module-level functions are the
    format with its default options, so VIMH and CIFAR take none and are unchanged."""

    @property
    def NAME(self) -> str: ...

    def splits(self, src: Path) -> tuple[str, ...]:
        """The splits present in ``src``, in conversion order."""

    def read_schema(self, src: Path, split: str) -> DatasetSchema:
        """The schema of ``split``; raises ConversionError on inconsistent input."""

    def count_samples(self, src: Path, split: str) -> int: ...

    def iter_blocks(self, src: Path, split: str,
                    indices: Sequence[int] | None = None) -> Iterator[SampleBlock]:
        """Samples at ``indices`` (all, in source order, when None), in that order, as
        blocks of any size (about :data:`BLOCK_BYTES` of images keeps memory small)."""


def get_format(name: str, options: Mapping[str, Any] | None = None) -> SourceFormat:
    """The converter module registered under ``name``, configured with ``options`` if any."""
    from shard_tools.converters import cifar100mh, imagenet100, vimh

    formats: dict[str, SourceFormat] = {"vimh": vimh, "cifar100mh": cifar100mh, "imagenet100": imagenet100}
    if name not in formats:
        raise ConversionError(f"unknown source format {name!r}; expected one of {sorted(formats)}")
    if not options:
        return formats[name]
    configure = getattr(formats[name], "configure", None)
    if configure is None:
        takes = sorted(n for n, f in formats.items() if hasattr(f, "configure"))
        raise ConversionError(f"source format {name!r} takes no options, found {sorted(options)} "
                              f"(formats with options: {takes})")
    configured: SourceFormat = configure(**options)
    return configured
