"""What every conversion strategy starts from: a :class:`SplitPlan`, made once per split.

It holds the split's source (:class:`SourceSplit`: a configured format object, the source
directory, the split), its schema, the order its samples are written in (a seeded
permutation, the same in every process) and the key that fingerprints everything the
shards depend on (for resume). Strategies receive the plan; none reads the schema or
lists the source again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.format.schema import DatasetSchema
from shard_tools.formats import SourceFormat
from shard_tools.staging import resume_key, source_fingerprint

Limits = tuple[int | None, int | None]  # (max_samples, max_bytes) of a shard


@dataclass(frozen=True)
class SourceSplit:
    """One split of a source dataset, read by a configured format (picklable: it goes to
    worker processes)."""

    format: SourceFormat
    src: Path
    split: str

    def describe(self) -> str:
        """The source as a resume key sees it: format, options and every file's size and time."""
        settings = sorted(self.format.settings.items())
        return f"{self.format.name}\0{settings}\0{source_fingerprint(self.src)}"


@dataclass(frozen=True)
class SplitPlan:
    """A split's source, schema, write order and resume key."""

    source: SourceSplit
    schema: DatasetSchema
    order: tuple[int, ...]
    key: str

    @property
    def split(self) -> str:
        return self.source.split


def sample_order(n: int, *, shuffle: bool, seed: int) -> list[int]:
    """Source indices in write order: a seeded permutation, or source order."""
    if not shuffle:
        return list(range(n))
    return [int(i) for i in np.random.default_rng(seed).permutation(n).tolist()]


def sample_keys(indices: np.ndarray) -> list[str]:
    """Each sample's key: its index in the source split, so every key traces back to it."""
    return [f"{index:08d}" for index in indices.tolist()]


def plan_split(source: SourceSplit, *, shuffle: bool, seed: int, limits: Limits) -> SplitPlan:
    """The plan of one split: its schema read once, its order, its resume key (which also
    covers the shard ``limits``; node shares pass their node count in place of max_bytes)."""
    fmt = source.format
    schema = fmt.read_schema(source.src, source.split)
    order = sample_order(fmt.count_samples(source.src, source.split), shuffle=shuffle, seed=seed)
    return SplitPlan(source, schema, tuple(order), resume_key(schema, order, source.describe(), limits))


def planned(order: Sequence[int], shard: int, max_samples: int) -> Sequence[int]:
    """The samples of planned slice ``shard``: ``order[shard*S:(shard+1)*S]``."""
    return order[shard * max_samples:(shard + 1) * max_samples]
