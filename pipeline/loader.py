"""The streaming loader: ``make_loader(source, ...)`` → batches of ``(images, labels)``.

Each dataloader worker plans its share of the epoch (:mod:`pipeline.planning`), reads whole
shards (:mod:`pipeline.storage`), walks them in memory (:mod:`pipeline.tario`), shuffles
samples within windows of ``shuffle_buffer`` samples, and assembles batches
(:mod:`pipeline.batching`). The loader counts the batches it has handed out, so
``state_dict()`` taken after ``k`` batches resumes with batch ``k + 1`` of the same order.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.batching import IMAGES, BatchAssembler, BatchRefs, DecodedShard, Transform, decode_shard, to_union
from pipeline.disk_cache import DEFAULT_LIMIT
from pipeline.errors import ManifestError, PipelineError, ShardFormatError
from pipeline.header import header_bytes
from pipeline.lifetime import DieWithParent
from pipeline.mixing import MixPlan
from pipeline.planning import Slice, WorkerPlan, batches_done_per_worker, epoch_rng, plan_epoch, worker_batches
from pipeline.schema import DatasetSchema
from pipeline.storage import read_shard
from pipeline.tario import index_shard
from pipeline.union import HeadMap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """Everything a worker needs to read its share of an epoch (picklable)."""

    shards: tuple[Slice, ...]
    schema: DatasetSchema
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 4096
    world_size: int = 1
    rank: int = 0
    num_workers: int = 0
    uneven: str = "drop"
    drop_last: bool = False
    on_error: str = "raise"
    storage_options: dict[str, Any] | None = None
    cache_dir: str | None = None
    cache_limit: int = DEFAULT_LIMIT
    retries: int = 3
    allow_pipe: bool = False
    batches_per_hand_off: int = 1
    mix: MixPlan | None = None  # several sources (``shards`` is then all of theirs)
    source_options: tuple[dict[str, Any] | None, ...] | None = None  # per mix source, replacing storage_options

    @property
    def group(self) -> int:
        """Batches a worker packs into one hand-off to the main process (1 without workers)."""
        return self.batches_per_hand_off if self.num_workers > 0 else 1

    def plan(self, epoch: int) -> list[WorkerPlan]:
        if self.mix is not None:
            return self.mix.plan(epoch, seed=self.seed, world_size=self.world_size, rank=self.rank,
                                 num_workers=self.num_workers, batch_size=self.batch_size, shuffle=self.shuffle,
                                 group=self.group, round_size=self.shuffle_buffer)
        return plan_epoch(self.shards, seed=self.seed, epoch=epoch, world_size=self.world_size,
                          rank=self.rank, num_workers=self.num_workers, batch_size=self.batch_size,
                          shuffle=self.shuffle, uneven=self.uneven, drop_last=self.drop_last, group=self.group)


KEEP_BYTES = 64 << 20  # per worker: decoded shards of cycled mix sources kept for the epoch


class _ShardCache:
    """The last shard loaded by this worker from each source (consecutive slices of a
    source often share a shard; a mix reads its sources side by side). Shards of a mix
    source that the epoch cycles through more than once are kept, up to ``KEEP_BYTES``."""

    def __init__(self, config: StreamConfig, head_map: HeadMap | None = None) -> None:
        self.config, self.head_map = config, head_map
        mix = config.mix
        self.schemas = mix.schemas if mix is not None else (config.schema,)
        self.cycled = [t > sum(len(s) for s in shards) for shards, t in zip(mix.sources, mix.targets, strict=True)] \
            if mix is not None else [False]
        self.headers = [header_bytes(schema) for schema in self.schemas]
        self.shards: dict[int, DecodedShard] = {}
        self.kept: dict[tuple[int, str], DecodedShard] = {}  # by (source, url): two sources may share files
        self.kept_bytes = 0
        self.listed = {(s.source, s.url): s.stop for s in config.shards}  # each shard's count in its manifest

    def get(self, url: str, source: int = 0) -> DecodedShard:
        shard = self.shards.get(source)
        if shard is None or shard.index.url != url:
            shard = self.kept.get((source, url)) or self._load(url, source)
            self.shards[source] = shard
        return shard

    def _load(self, url: str, source: int) -> DecodedShard:
        c = self.config
        options = c.storage_options if c.source_options is None else c.source_options[source]
        data = read_shard(url, storage_options=options, retries=c.retries, cache_dir=c.cache_dir,
                          cache_limit=c.cache_limit, allow_pipe=c.allow_pipe)
        index = index_shard(data, url, self.headers[source], tolerant=c.on_error == "skip")
        if index.error:
            log.warning("%s", index.error)
        self._check_count(url, len(index), self.listed.get((source, url)), index.error is None)
        shard = decode_shard(index, self.schemas[source], source)
        if self.head_map is not None:
            shard = to_union(shard, c.schema, self.head_map)
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


def stream_windows(plan: WorkerPlan, config: StreamConfig, skip: int = 0,
                   head_map: HeadMap | None = None) -> Iterator[BatchRefs]:
    """A worker's samples in epoch order, one window at a time, starting after the first
    ``skip``. Within each window of ``shuffle_buffer`` samples the order is a seeded
    permutation."""
    cache = _ShardCache(config, head_map)
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
        windows = stream_windows(plans[worker], c, skip=done * c.batch_size, head_map=self.assembler.head_map)
        batches = cut_batches(windows, c.batch_size)
        for _, turn in itertools.groupby(mine[done:], key=lambda j: j // group):
            yield self.assembler(list(itertools.islice(batches, len(list(turn)))), with_keys=self.with_keys)
        self.assembler.log_errors(f"rank {c.rank} worker {worker} epoch {epoch}")


class ShardLoader:
    """Iterable over one epoch of batches at a time; resumable mid-epoch.

    Each full pass advances the epoch; ``set_epoch`` chooses one. ``state_dict()`` records
    the epoch and the batches handed out so far; ``load_state_dict`` makes the next pass
    continue right after them."""

    def __init__(self, stream: ShardStream, *, prefetch_factor: int = 2, pin_memory: bool = False,
                 timeout: float = 0) -> None:
        self.stream = stream
        self.prefetch_factor, self.pin_memory, self.timeout = prefetch_factor, pin_memory, timeout
        self.epoch = 0
        self._resume = 0
        self._done = 0
        self._loader: DataLoader | None = None
        self.realized: dict[str, int] = {}  # a mix: samples per source in the last full pass
        self.image_shape: tuple[int, ...] | None = None  # a mix: (C, H, W) its transforms were found to give

    @property
    def schema(self) -> DatasetSchema:
        return self.stream.config.schema

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch."""
        return sum(p.num_samples for p in self.stream.config.plan(self.epoch))

    def __len__(self) -> int:
        return sum(p.num_batches for p in self.stream.config.plan(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._resume = epoch, 0

    def _dataloader(self) -> DataLoader:
        """One DataLoader for the loader's life: its workers persist across epochs."""
        if self._loader is None:
            workers = self.stream.config.num_workers
            self._loader = DataLoader(self.stream, batch_size=None, num_workers=workers,
                                      pin_memory=self.pin_memory, persistent_workers=workers > 0,
                                      prefetch_factor=self.prefetch_factor if workers else None,
                                      timeout=self.timeout, worker_init_fn=DieWithParent())
        return self._loader

    def __iter__(self) -> Iterator[Any]:
        self.stream.start(self.epoch, self._resume)
        loader = self._dataloader()
        self._done = self._resume
        with_keys = self.stream.with_keys
        mix = self.stream.config.mix
        counts = np.zeros(len(mix.targets) if mix is not None else 0, dtype=np.int64)
        last = len(self) if mix is not None else -1
        for group in loader:
            if group.source_counts is not None:
                counts += group.source_counts
            for fields, keys in group.batches():
                self._done += 1
                images = fields.pop(IMAGES)
                if self._done == last:  # before the last batch: a trainer may stop asking after it
                    self.realized = self._log_realized(mix, counts)  # type: ignore[arg-type]
                yield (images, fields, keys) if with_keys else (images, fields)
        self.epoch, self._resume, self._done = self.epoch + 1, 0, 0

    def _log_realized(self, mix: MixPlan, counts: np.ndarray) -> dict[str, int]:
        """Log this rank's samples per source in the epoch just read, against the plan."""
        c = self.stream.config
        total = max(1, int(counts.sum()))
        parts = [f"{name} {n / total:.4f} ({n}/{total}, target {t / mix.epoch_samples:.4f})"
                 for name, n, t in zip(mix.names, counts.tolist(), mix.targets, strict=True)]
        resumed = f" (resumed after {self._resume} batches: counts cover the rest)" if self._resume else ""
        log.info("mix epoch %d rank %d realized proportions: %s%s", self.epoch, c.rank, ", ".join(parts), resumed)
        return dict(zip(mix.names, counts.tolist(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        c = self.stream.config
        return {"epoch": self.epoch, "batches_done": self._done, "seed": c.seed, "batch_size": c.batch_size,
                "world_size": c.world_size, "rank": c.rank, "num_workers": max(1, c.num_workers), "group": c.group,
                "shuffle": c.shuffle, "shuffle_buffer": c.shuffle_buffer, "drop_last": c.drop_last,
                "mix_sources": list(c.mix.names) if c.mix is not None else None,
                "num_samples": sum(len(s) for s in c.shards),
                "mix_targets": list(c.mix.targets) if c.mix is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "batch_size", "world_size", "rank", "num_workers", "group", "shuffle", "shuffle_buffer",
                    "drop_last", "num_samples", "mix_sources", "mix_targets"):
            if state.get(key) != mine[key]:
                raise PipelineError(f"loader state: {key} expected {mine[key]!r} (this loader), found "
                                    f"{state.get(key)!r}; resume needs the same data and loader settings")
        self.epoch, self._resume = int(state["epoch"]), int(state["batches_done"])
        self._done = self._resume


def default_world() -> tuple[int, int]:
    """(world_size, rank) of the running torch.distributed group, else 1, 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def build_loader(config: StreamConfig, *, transform: Transform | None = None, with_keys: bool = False,
                 prefetch_factor: int = 2, pin_memory: bool = False, head_map: HeadMap | None = None,
                 source_transforms: Sequence[Transform | None] | None = None) -> ShardLoader:
    inputs = config.mix.schemas if config.mix is not None else None
    assembler = BatchAssembler(config.schema, transform=transform, on_error=config.on_error, inputs=inputs,
                               head_map=head_map, source_transforms=source_transforms)
    return ShardLoader(ShardStream(config, assembler, with_keys), prefetch_factor=prefetch_factor,
                       pin_memory=pin_memory)
