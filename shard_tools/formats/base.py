"""What every source format shares: the :class:`SampleBlock` a format yields, the
:class:`SourceFormat` protocol a format object follows, and how a format describes itself
to the registry (:class:`FormatEntry`) and to the command line (:class:`CliOption`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.errors import ConversionError
from pipeline.format.schema import DatasetSchema

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
    """A source format with its options: a frozen, picklable object (it travels to worker
    processes), made by its registry entry's ``configure`` (:mod:`shard_tools.formats`)."""

    @property
    def name(self) -> str:
        """The format's registry name (``vimh``, ``imagenet100``)."""

    @property
    def settings(self) -> Mapping[str, Any]:
        """Every option the format was configured with, defaults included (part of what a
        conversion's resume key depends on)."""

    def splits(self, src: Path) -> tuple[str, ...]:
        """The splits present in ``src``, in conversion order."""

    def read_schema(self, src: Path, split: str) -> DatasetSchema:
        """The schema of ``split``; raises ConversionError on inconsistent input."""

    def count_samples(self, src: Path, split: str) -> int: ...

    def iter_blocks(self, src: Path, split: str,
                    indices: Sequence[int] | None = None) -> Iterator[SampleBlock]:
        """Samples at ``indices`` (all, in source order, when None), in that order, as
        blocks of any size (about :data:`BLOCK_BYTES` of images keeps memory small)."""


@dataclass(frozen=True)
class CliOption:
    """A command-line option of one format (``shards convert`` or ``shards generate``):
    ``flag`` such as ``--resize``, the keyword it becomes (``dest``), and argparse's
    ``type``/``choices``/``metavar``/``action`` and help."""

    flag: str
    dest: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    action: str | None = None

    def argparse_kwargs(self) -> dict[str, Any]:
        given = {"type": self.type, "choices": self.choices, "metavar": self.metavar, "action": self.action}
        return {"dest": self.dest, "help": self.help, "default": None, **{k: v for k, v in given.items() if v}}


@dataclass(frozen=True)
class Generator:
    """A synthetic source a format can write (``shards generate --format NAME``):
    ``run(out, n_train=, n_test=, seed=, **options)`` returns the directory written;
    ``defaults`` are its train and test sizes when not given."""

    name: str
    help: str
    run: Callable[..., Path]
    defaults: tuple[int, int]
    options: tuple[CliOption, ...] = ()
    done_message: str = "synthetic source"


@dataclass(frozen=True)
class FormatEntry:
    """A source format as the registry lists it: ``configure(**options)`` gives the format
    object, ``options`` are its ``shards convert`` options, ``generators`` the synthetic
    sources of its layout (for tests and demos)."""

    name: str
    help: str
    configure: Callable[..., SourceFormat]
    options: tuple[CliOption, ...] = ()
    generators: tuple[Generator, ...] = field(default=())

    def format(self, options: Mapping[str, Any] | None = None) -> SourceFormat:
        """The format with ``options``; options for a format that takes none are a
        ConversionError (a format with options checks their names itself)."""
        given = dict(options or {})
        if given and not self.options:
            raise ConversionError(f"source format {self.name!r} takes no options, found {sorted(given)}")
        return self.configure(**given)
