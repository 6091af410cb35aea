"""The shared memory that carries batches from dataloader workers to the main process.

A fresh shared-memory segment per hand-off costs more than decoding small images: the
worker creates, sizes and faults in the pages of a new segment, and the main process maps
and unmaps it. So each worker keeps a few segments (:class:`HandOffBuffers`) and reuses one
once the main process holds no tensor on it any more. ``busy[w, k]``, a small tensor in
shared memory, is set by worker ``w`` when it fills its buffer ``k`` and cleared by the main
process (:class:`Recycler`) when every tensor it received on that buffer is gone: batches
the training loop keeps are never overwritten. When all of a worker's buffers are held,
it takes a fresh segment, so a consumer that keeps batches never stalls the workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import get_worker_info

Slot = tuple[int, int]  # (worker, buffer)


def _shared(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8).share_memory_()


class HandOffBuffers:
    """Each worker's reusable hand-off buffers (made in the main process, picklable; the
    buffers themselves are made in the workers, on first use)."""

    def __init__(self, workers: int, slots: int) -> None:
        self.slots = slots
        self.busy = torch.zeros((max(workers, 1), slots), dtype=torch.int32).share_memory_()
        self._own: dict[int, torch.Tensor] = {}  # this worker's buffers
        self._next = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_own": {}, "_next": 0}

    def take(self, nbytes: int) -> tuple[torch.Tensor, Slot | None]:
        """``nbytes`` of memory for one hand-off, and the slot it lies in (None: memory of its
        own: plain memory in the main process, a fresh segment when every buffer is held)."""
        info = get_worker_info()
        if info is None:  # numpy's large arrays ask for huge pages: 5x cheaper to fault in than torch.empty's
            return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)), None
        if info.id >= len(self.busy):
            return _shared(nbytes), None
        busy = self.busy.numpy()[info.id]
        for step in range(self.slots):
            k = (self._next + step) % self.slots
            if busy[k] == 0:
                buffer = self._own.get(k)
                if buffer is None or buffer.numel() < nbytes:
                    buffer = self._own[k] = _shared(nbytes)
                busy[k] = 1
                self._next = k + 1
                return buffer[:nbytes], (info.id, k)
        return _shared(nbytes), None


class Recycler:
    """The main process's side: watches each received buffer and frees its slot for the
    worker once nothing here refers to it."""

    def __init__(self, busy: torch.Tensor) -> None:
        self.busy = busy.numpy()
        self.pending: list[tuple[StorageWeakRef, Slot]] = []

    def watch(self, buffer: torch.Tensor, slot: Slot | list[int] | None) -> None:
        """First free the slots no longer referred to, then watch ``buffer`` (received on
        ``slot``)."""
        still = []
        for ref, (worker, k) in self.pending:
            if ref.expired():
                self.busy[worker, k] = 0
            else:
                still.append((ref, (worker, k)))
        self.pending = still
        if slot is not None:
            worker, k = slot  # a tuple crosses the DataLoader's queue as a list
            self.pending.append((StorageWeakRef(buffer.untyped_storage()), (worker, k)))
