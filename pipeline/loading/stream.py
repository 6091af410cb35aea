"""A worker's share of an epoch as batches: the iterable dataset behind a loader.

Each dataloader worker plans its share of the epoch (the config's planner), reads whole
shards (:mod:`pipeline.io.storage`), indexes and checks them in memory
(:mod:`pipeline.format.shard_index`), decodes their labels into columns
(:mod:`pipeline.loading.decoded`), shuffles samples within windows of ``shuffle_buffer``
samples, and assembles batches (:mod:`pipeline.loading.assembler`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.errors import ManifestError, ShardFormatError
from pipeline.format.header import header_bytes
from pipeline.format.schema import DatasetSchema
from pipeline.format.shard_index import index_shard
from pipeline.io.disk_cache import DEFAULT_LIMIT
from pipeline.io.storage import read_shard
from pipeline.loading.assembler import BatchAssembler
from pipeline.loading.decoded import BatchRefs, DecodedShard, decode_shard
from pipeline.loading.inputs import ShardInput
from pipeline.loading.planning import (
    EpochPlanner,
    PlanLayout,
    Slice,
    WorkerPlan,
    batches_done_per_worker,
    epoch_rng,
    worker_batches,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """Everything a worker needs to read its share of an epoch (picklable): the inputs, their
    planner, the batches' schema and the loader's settings."""

    inputs: tuple[ShardInput, ...]
    planner: EpochPlanner
    schema: DatasetSchema
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 4096
    world_size: int = 1
    rank: int = 0
    num_workers: int = 0
    on_error: str = "raise"
    cache_dir: str | None = None
    cache_limit: int = DEFAULT_LIMIT
    retries: int = 3
    allow_pipe: bool = False
    batches_per_hand_off: int = 1

    @property
    def group(self) -> int:
        """Batches a worker packs into one hand-off to the main process (1 without workers)."""
        return self.batches_per_hand_off if self.num_workers > 0 else 1

    @property
    def layout(self) -> PlanLayout:
        return PlanLayout(seed=self.seed, world_size=self.world_size, rank=self.rank, num_workers=self.num_workers,
                          batch_size=self.batch_size, shuffle=self.shuffle, group=self.group,
                          shuffle_buffer=self.shuffle_buffer)

    def plan(self, epoch: int) -> list[WorkerPlan]:
        return self.planner.plan(epoch, self.layout)


RANK_DRAWS = 1 << 40  # samples a rank may draw crops for in one epoch (ranks draw apart)
KEEP_BYTES = 64 << 20  # per worker: decoded shards of inputs read more than once an epoch, kept


class _ShardCache:
    """The last shard loaded by this worker from each input (consecutive slices of an input
    often share a shard; several inputs are read side by side). Shards of an input that the
    epoch cycles through more than once are kept, up to ``KEEP_BYTES``."""

    def __init__(self, config: StreamConfig) -> None:
        self.config = config
        self.cycled = [target > put.num_samples for put, target in zip(config.inputs, config.planner.targets,
                                                                        strict=True)]
        self.headers = [header_bytes(put.schema) for put in config.inputs]
        self.shards: dict[int, DecodedShard] = {}
        self.kept: dict[tuple[int, str], DecodedShard] = {}  # by (input, url): two inputs may share files
        self.kept_bytes = 0
        self.listed = {(s.source, s.url): s.stop for put in config.inputs for s in put.shards}  # manifest counts

    def get(self, url: str, source: int = 0) -> DecodedShard:
        shard = self.shards.get(source)
        if shard is None or shard.index.url != url:
            shard = self.kept.get((source, url)) or self._load(url, source)
            self.shards[source] = shard
        return shard

    def _load(self, url: str, source: int) -> DecodedShard:
        c = self.config
        put = c.inputs[source]
        options = dict(put.storage_options) if put.storage_options is not None else None
        data = read_shard(url, storage_options=options, retries=c.retries, cache_dir=c.cache_dir,
                          cache_limit=c.cache_limit, allow_pipe=c.allow_pipe)
        index = index_shard(data, url, self.headers[source], tolerant=c.on_error == "skip")
        if index.error:
            log.warning("%s", index.error)
        self._check_count(url, len(index), self.listed.get((source, url)), index.error is None)
        shard = decode_shard(index, put.schema, source)
        if put.relabel is not None:
            shard = put.relabel(shard)
        if self.cycled[source] and self.kept_bytes + len(data) <= KEEP_BYTES:
            self.kept[(source, url)] = shard
            self.kept_bytes += len(data)
        return shard


    def _check_count(self, url: str, found: int, listed: int | None, complete: bool) -> None:
        """A shard must hold the samples its manifest lists: more would be silently left out,
        fewer read as missing. ``raise``: an error; ``skip``: a warning (missing samples are
        replaced, extra ones are not read)."""
        if listed is None or found == listed or (found < listed and not complete):
            return  # a shard cut short was warned about, and its missing samples are replaced
        message = (f"{url}: the manifest lists {listed} samples, the shard holds {found}; the manifest does not "
                   "describe this shard")
        if self.config.on_error == "raise":
            raise ManifestError(message)
        more = "samples after the listed ones are not read" if found > listed else "the missing ones are replaced"
        log.warning("%s (%s)", message, more)


def _slice_positions(piece: Slice, shard: DecodedShard, config: StreamConfig) -> np.ndarray:
    """Sample positions of one slice. In ``skip`` mode, samples known to be bad are left
    out and the slice's other samples repeated in their place, so each source keeps its
    count (a slice with no good sample left is empty: the window fills it)."""
    have = len(shard.index)
    if have < piece.stop and config.on_error == "raise":
        raise ShardFormatError(f"{piece.url}: expected at least {piece.stop} samples (from the manifest), "
                               f"found {have}")
    positions = np.arange(piece.start, min(piece.stop, have))
    if config.on_error == "skip" and shard.problems:
        positions = positions[~np.isin(positions, np.fromiter(shard.problems, dtype=np.int64))]
    if len(positions) < len(piece):
        bad = sorted(i for i in shard.problems if piece.start <= i < piece.stop)
        reason = f"{shard.index.keys[bad[0]]}.{shard.problems[bad[0]]}" if bad else "not in the shard"
        log.warning("%s: skipped %d bad sample(s) of samples %d..%d (first: %s); repeating others to keep the "
                    "epoch exact", piece.url, len(piece) - len(positions), piece.start, piece.stop - 1, reason)
    return np.resize(positions, len(piece)) if 0 < len(positions) < len(piece) else positions


def _windows(slices: Sequence[Slice], size: int, planned: Sequence[int] | None = None) -> list[list[Slice]]:
    """Consecutive slices grouped into windows of at least ``size`` samples, or into the
    ``planned`` numbers of slices (a mix's rounds)."""
    if planned is not None:
        bounds = list(itertools.accumulate(planned, initial=0))
        return [list(slices[a:b]) for a, b in itertools.pairwise(bounds)]
    windows: list[list[Slice]] = [[]]
    for piece in slices:
        if windows[-1] and sum(len(s) for s in windows[-1]) >= size:
            windows.append([])
        windows[-1].append(piece)
    return [w for w in windows if w]


def stream_windows(plan: WorkerPlan, config: StreamConfig, skip: int = 0) -> Iterator[BatchRefs]:
    """A worker's samples in epoch order, one window at a time, starting after the first
    ``skip``. Within each window of ``shuffle_buffer`` samples the order is a seeded
    permutation."""
    cache = _ShardCache(config)
    size = config.shuffle_buffer  # without shuffle too: a slice with no readable sample borrows from its window
    for number, window in enumerate(_windows(plan.slices, max(1, size), plan.windows)):
        count = sum(len(s) for s in window)
        if skip >= count:
            skip -= count
            continue
        shards = [cache.get(piece.url, piece.source) for piece in window]
        positions = [_slice_positions(p, shard, config) for p, shard in zip(window, shards, strict=True)]
        which = np.concatenate([np.full(len(p), k) for k, p in enumerate(positions)])
        where = np.concatenate(positions)
        if len(where) == 0:
            raise ShardFormatError(f"{window[0].url}: no readable sample in this part of the epoch")
        if len(where) < count:  # skip mode: keep counts exact by repeating readable samples
            log.warning("%s: %d sample(s) unreadable; repeating others to keep the epoch exact",
                        window[0].url, count - len(where))
            which, where = np.resize(which, count), np.resize(where, count)
        if config.shuffle:
            order = epoch_rng(*plan.window_seed, number).permutation(count)
            which, where = which[order], where[order]
        yield BatchRefs(shards, which[skip:], where[skip:])
        skip = 0


def cut_batches(windows: Iterator[BatchRefs], batch_size: int) -> Iterator[BatchRefs]:
    """Consecutive batches of ``batch_size`` samples (the last may be short) across windows."""
    pending: list[BatchRefs] = []
    held = 0
    for window in windows:
        start = 0
        while held + len(window) - start >= batch_size:
            take = batch_size - held
            pending.append(BatchRefs(window.shards, window.which[start:start + take],
                                     window.where[start:start + take]))
            yield _join(pending)
            pending, held, start = [], 0, start + take
        if start < len(window):
            pending.append(BatchRefs(window.shards, window.which[start:], window.where[start:]))
            held += len(window) - start
    if pending:
        yield _join(pending)


def _join(parts: list[BatchRefs]) -> BatchRefs:
    if len(parts) == 1:
        return parts[0]
    shards: list[DecodedShard] = []
    whichs = []
    for part in parts:
        whichs.append(part.which + len(shards))
        shards.extend(part.shards)
    return BatchRefs(shards, np.concatenate(whichs), np.concatenate([p.where for p in parts]))


class ShardStream(IterableDataset):
    """The iterable dataset behind :class:`ShardLoader`; yields whole batches."""

    def __init__(self, config: StreamConfig, assembler: BatchAssembler, with_keys: bool = False) -> None:
        self.config, self.assembler, self.with_keys = config, assembler, with_keys
        # (epoch, batches already done): in shared memory, so persistent workers see each
        # pass's values without being restarted
        self.control = torch.zeros(2, dtype=torch.int64).share_memory_()

    def start(self, epoch: int, batches_done: int) -> None:
        """Set the pass the next iteration (in this process or in workers) produces."""
        self.control[0], self.control[1] = epoch, batches_done

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        c = self.config
        workers, group = max(1, c.num_workers), c.group
        epoch, batches_done = (int(x) for x in self.control.tolist())
        # The DataLoader polls its workers round-robin from worker 0; after a resume at batch
        # k, worker 0 must therefore play the planned worker that makes batch k.
        worker = ((info.id if info is not None else 0) + batches_done // group) % workers
        plans = c.plan(epoch)
        mine = worker_batches(sum(p.num_batches for p in plans), workers, worker, group)
        done = batches_done_per_worker(batches_done, workers, group)[worker]
        windows = stream_windows(plans[worker], c, skip=done * c.batch_size)
        batches = cut_batches(windows, c.batch_size)
        for _, turn in itertools.groupby(mine[done:], key=lambda j: j // group):
            numbers = list(turn)
            starts = [c.rank * RANK_DRAWS + j * c.batch_size for j in numbers]  # each sample's place in the epoch
            yield self.assembler(list(itertools.islice(batches, len(numbers))), with_keys=self.with_keys,
                                 draws=(epoch, starts))
        self.assembler.log_errors(f"rank {c.rank} worker {worker} epoch {epoch}")


