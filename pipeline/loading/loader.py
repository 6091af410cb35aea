"""The streaming loader: an iterable over one epoch of batches at a time, resumable mid-epoch.

:class:`ShardLoader` wraps one ``DataLoader`` (persistent workers) over a
:class:`~pipeline.loading.stream.ShardStream`. It counts the batches it has handed out,
so ``state_dict()`` taken after ``k`` batches resumes with batch ``k + 1`` of the same order.
With several inputs (a mix) it also counts each input's samples, logs the proportions an
epoch realized, and keeps them in ``realized``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.errors import PipelineError
from pipeline.format.schema import DatasetSchema
from pipeline.lifetime import DieWithParent
from pipeline.loading.assembler import IMAGES, BatchAssembler
from pipeline.loading.hand_off import HandOffBuffers, Recycler
from pipeline.loading.inputs import Transform
from pipeline.loading.stream import ShardStream, StreamConfig

log = logging.getLogger(__name__)
HELD_HAND_OFFS = 3  # a worker's buffers beyond those queued: one being filled, two the training loop holds


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
        self.realized: dict[str, int] = {}  # samples per input in the last full pass (several inputs)
        self.image_shape: tuple[int, ...] | None = None  # (C, H, W) the inputs' transforms were found to give
        self._recycler = Recycler(stream.assembler.buffers.busy)

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
        self._recycler.release()  # what the last pass's consumer has let go of
        self.stream.start(self.epoch, self._resume)
        self._done = self._resume
        with_keys = self.stream.with_keys
        counts = np.zeros(len(self.stream.config.inputs), dtype=np.int64)
        last = len(self)
        for group in self._groups():
            self._recycler.watch(group.buffer, group.slot)
            counts += group.input_counts
            for fields, keys in group.batches():
                self._done += 1
                images = fields.pop(IMAGES)
                if self._done == last:  # before the last batch: a trainer may stop asking after it
                    self.realized = self._realized(counts)
                yield (images, fields, keys) if with_keys else (images, fields)
            del group, fields, images
        self._recycler.release()
        self.epoch, self._resume, self._done = self.epoch + 1, 0, 0

    def _groups(self) -> Iterator[Any]:
        """The DataLoader's hand-offs. When the pass fails (a worker raised, or died), the
        workers are stopped at once, so none outlives a failed pass and the next pass
        starts fresh ones; a dead worker is a PipelineError naming it."""
        try:
            yield from self._dataloader()
        except GeneratorExit:  # the caller stopped early: the workers serve the next pass
            raise
        except RuntimeError as e:
            self.close()
            if "DataLoader worker" not in str(e):
                raise
            raise PipelineError(f"a dataloader worker of this loader died ({e}); its other workers were stopped "
                                "and the next pass starts new ones") from e
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the loader's worker processes now (a later pass starts new ones)."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._recycler.reset()

    def _realized(self, counts: np.ndarray) -> dict[str, int]:
        """This rank's samples per input in the epoch just read; logged against the plan
        when there are several inputs."""
        c = self.stream.config
        names = [put.name for put in c.inputs]
        if len(names) > 1:
            total, planned = max(1, int(counts.sum())), sum(c.planner.targets)
            parts = [f"{name} {n / total:.4f} ({n}/{total}, target {t / planned:.4f})"
                     for name, n, t in zip(names, counts.tolist(), c.planner.targets, strict=True)]
            resumed = f" (resumed after {self._resume} batches: counts cover the rest)" if self._resume else ""
            log.info("mix epoch %d rank %d realized proportions: %s%s", self.epoch, c.rank, ", ".join(parts),
                     resumed)
        return dict(zip(names, counts.tolist(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        c = self.stream.config
        return {"epoch": self.epoch, "batches_done": self._done, "seed": c.seed, "batch_size": c.batch_size,
                "world_size": c.world_size, "rank": c.rank, "num_workers": max(1, c.num_workers), "group": c.group,
                "shuffle": c.shuffle, "shuffle_buffer": c.shuffle_buffer,
                "inputs": [put.name for put in c.inputs], "planner": c.planner.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "batch_size", "world_size", "rank", "num_workers", "group", "shuffle", "shuffle_buffer",
                    "inputs", "planner"):
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
                 prefetch_factor: int = 2, pin_memory: bool = False) -> ShardLoader:
    """The loader of a stream config: batches in ``config.schema``, each input's images
    through its own transform, then ``transform``."""
    buffers = HandOffBuffers(config.num_workers, slots=prefetch_factor + HELD_HAND_OFFS)
    assembler = BatchAssembler(config.schema, config.inputs, transform=transform, on_error=config.on_error,
                               seed=config.seed, buffers=buffers)
    return ShardLoader(ShardStream(config, assembler, with_keys), prefetch_factor=prefetch_factor,
                       pin_memory=pin_memory)
