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
    """The main process's side: frees a worker's buffer once nothing here refers to it.

    Each buffer's storage is kept here once received, so torch maps a reused segment only
    once (``rebuild_storage_fd`` finds it in its cache; mapping it anew each time made the
    training loop fault in every page again, 30-50 µs a sample), and the buffer is free
    when that kept reference is the only one left. Without torch's use count (a private
    API, pinned by a test) a weak reference says when the storage is gone."""

    def __init__(self, busy: torch.Tensor) -> None:
        self.busy = busy.numpy()
        self.kept: dict[Slot, torch.UntypedStorage] = {}
        self.pending: list[tuple[Slot, Any]] = []
        self.counted = hasattr(torch._C, "_storage_Use_Count")

    def watch(self, buffer: torch.Tensor, slot: Slot | list[int] | None) -> None:
        """Free the buffers no longer referred to, then watch ``buffer``, received on ``slot``."""
        self.release()
        if slot is None:
            return
        worker, k = slot  # a tuple crosses the DataLoader's queue as a list
        storage = buffer.untyped_storage()
        if self.counted:
            kept = self.kept.get((worker, k))
            if kept is None or kept.data_ptr() != storage.data_ptr():
                self.kept[(worker, k)] = kept = storage
            self.pending.append(((worker, k), kept))
        else:
            self.pending.append(((worker, k), StorageWeakRef(storage)))
        del storage

    def release(self) -> None:
        """Give back to their workers the buffers nothing here refers to any more."""
        still = []
        for (worker, k), ref in self.pending:
            free = torch._C._storage_Use_Count(ref._cdata) == 1 if self.counted else ref.expired()
            if free:
                self.busy[worker, k] = 0
            else:
                still.append(((worker, k), ref))
        self.pending = still

    def reset(self) -> None:
        """The workers are gone: no buffer is in use, and none will come back."""
        self.busy[:] = 0
        self.pending, self.kept = [], {}
