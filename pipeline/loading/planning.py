"""Epoch planning: which samples of which shards each (rank, worker) reads, in one place.

An epoch's samples are a sequence of shard *slices* (``url``, ``start``, ``stop``). The
plan shuffles the slice order with ``(seed, epoch)``, cuts the sequence into equal
contiguous ranges, one per rank, and cuts each rank's range into per-worker ranges whose
lengths make batch ``j`` of the rank come from worker ``(j // group) % num_workers``
(workers take turns, ``group`` batches a turn, handed to the main process together):
exactly the order in which a PyTorch ``DataLoader`` takes items from the workers of an
iterable dataset. So every rank yields the same number of batches, and a resume after
``k`` batches knows how many batches each worker had produced.

Uneven totals: with ``uneven="drop"`` each rank gets ``N // world_size`` samples and the
last ``N % world_size`` of the shuffled sequence are left out of this epoch (a different
few each epoch); with ``uneven="pad"`` each rank gets ``ceil(N / world_size)`` and the
sequence wraps around, repeating its first samples.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.errors import ShardFormatError


@dataclass(frozen=True)
class Slice:
    """Samples ``start`` (inclusive) to ``stop`` (exclusive) of one shard, by position."""

    url: str
    start: int
    stop: int
    source: int = 0

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class WorkerPlan:
    """What one dataloader worker of one rank reads in one epoch."""

    slices: tuple[Slice, ...]
    num_samples: int
    num_batches: int
    window_seed: tuple[int, ...]
    windows: tuple[int, ...] | None = None  # slices per shuffle window (None: by sample count)


def epoch_rng(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    """The generator for one purpose of one epoch: independent of every other stream."""
    return np.random.default_rng([seed, epoch, *stream])


def shuffled_slices(slices: Sequence[Slice], *, seed: int, epoch: int, shuffle: bool) -> list[Slice]:
    if not shuffle:
        return list(slices)
    order = epoch_rng(seed, epoch, 0).permutation(len(slices))
    return [slices[int(i)] for i in order]


def take_range(slices: Sequence[Slice], begin: int, end: int) -> list[Slice]:
    """Samples ``begin:end`` of the concatenation of ``slices`` (wrapping around) as slices."""
    starts = list(itertools.accumulate((len(s) for s in slices), initial=0))
    total = starts[-1]
    out: list[Slice] = []
    while begin < end:
        offset = begin % total
        i = bisect.bisect_right(starts, offset) - 1
        s = slices[i]
        start = s.start + offset - starts[i]
        stop = min(s.stop, start + end - begin)
        out.append(Slice(s.url, start, stop, s.source))
        begin += stop - start
    return out


def rank_range(total: int, world_size: int, rank: int, uneven: str) -> tuple[int, int]:
    """Samples ``[begin, end)`` of an epoch's ``total`` that ``rank`` reads (settings checked
    by :func:`~pipeline.loading.settings.check_loader_settings`)."""
    per_rank = total // world_size if uneven == "drop" else math.ceil(total / world_size)
    return rank * per_rank, (rank + 1) * per_rank


def batch_worker(batch: int, num_workers: int, group: int = 1) -> int:
    """The worker that makes batch ``batch``: workers take turns, ``group`` batches a turn."""
    return (batch // group) % num_workers


def worker_batches(num_batches: int, num_workers: int, worker: int, group: int = 1) -> list[int]:
    """The batches (by number in the rank's epoch) that ``worker`` makes, in order."""
    return [j for j in range(num_batches) if batch_worker(j, num_workers, group) == worker]


def worker_sample_counts(num_samples: int, batch_size: int, num_workers: int, group: int = 1) -> list[int]:
    """Samples per worker such that batch ``j`` comes from worker ``(j // group) % num_workers``."""
    num_batches = math.ceil(num_samples / batch_size)
    counts = [len(worker_batches(num_batches, num_workers, w, group)) * batch_size for w in range(num_workers)]
    if num_batches:
        counts[batch_worker(num_batches - 1, num_workers, group)] -= num_batches * batch_size - num_samples
    return counts


def batches_done_per_worker(batches_done: int, num_workers: int, group: int = 1) -> list[int]:
    """Batches each worker has produced once the loader has yielded ``batches_done``."""
    return [len(worker_batches(batches_done, num_workers, w, group)) for w in range(num_workers)]


def plan_epoch(slices: Sequence[Slice], *, seed: int, epoch: int, world_size: int, rank: int,
               num_workers: int, batch_size: int, shuffle: bool = True,
               uneven: str = "drop", drop_last: bool = False, group: int = 1) -> list[WorkerPlan]:
    """Per-worker plans of ``rank`` for ``epoch`` (``num_workers`` = 0 is planned as 1).
    ``drop_last`` leaves out each rank's final partial batch."""
    ordered = shuffled_slices([s for s in slices if len(s)], seed=seed, epoch=epoch, shuffle=shuffle)
    total = sum(len(s) for s in ordered)
    if total == 0:
        raise ShardFormatError("the epoch has no samples to plan")
    begin, end = rank_range(total, world_size, rank, uneven)
    if drop_last:
        end = begin + (end - begin) // batch_size * batch_size
    workers = max(1, num_workers)
    plans, cursor = [], begin
    for w, count in enumerate(worker_sample_counts(end - begin, batch_size, workers, group)):
        mine = take_range(ordered, cursor, cursor + count)
        cursor += count
        plans.append(WorkerPlan(slices=tuple(mine), num_samples=count,
                                num_batches=math.ceil(count / batch_size),
                                window_seed=(seed, epoch, 1, rank, w)))
    return plans


@dataclass(frozen=True)
class PlanLayout:
    """How an epoch is laid out over ranks, workers and batches (the loader's settings)."""

    seed: int
    world_size: int
    rank: int
    num_workers: int
    batch_size: int
    shuffle: bool
    group: int  # batches a worker hands over at once
    shuffle_buffer: int


class EpochPlanner(Protocol):
    """Plans every epoch of a loader's inputs for one rank; picklable (it goes to workers)."""

    @property
    def targets(self) -> tuple[int, ...]:
        """Samples each input gives per epoch (all ranks together)."""

    def plan(self, epoch: int, layout: PlanLayout) -> list[WorkerPlan]:
        """Per-worker plans of ``layout.rank`` for ``epoch`` (``num_workers`` 0 planned as 1)."""

    def state(self) -> dict[str, Any]:
        """The settings a resumed loader must share with the one that saved its state."""


@dataclass(frozen=True)
class SinglePlanner:
    """One shard set: :func:`plan_epoch` over its shards."""

    shards: tuple[Slice, ...]
    uneven: str = "drop"
    drop_last: bool = False

    @property
    def targets(self) -> tuple[int, ...]:
        return (sum(len(s) for s in self.shards),)

    def plan(self, epoch: int, layout: PlanLayout) -> list[WorkerPlan]:
        return plan_epoch(self.shards, seed=layout.seed, epoch=epoch, world_size=layout.world_size,
                          rank=layout.rank, num_workers=layout.num_workers, batch_size=layout.batch_size,
                          shuffle=layout.shuffle, uneven=self.uneven, drop_last=self.drop_last, group=layout.group)

    def state(self) -> dict[str, Any]:
        return {"uneven": self.uneven, "drop_last": self.drop_last, "targets": list(self.targets)}
