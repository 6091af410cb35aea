"""Callbacks: the share of training time spent waiting for batches, and a metrics summary."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class DataStall(L.Callback):
    """Logs ``train/data_stall_share``: time between the end of one training batch and the
    start of the next (waiting for data), over that plus the time spent in the batches."""

    def __init__(self) -> None:
        self.waiting = self.computing = 0.0
        self._batch_start: float | None = None
        self._batch_end: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.waiting = self.computing = 0.0
        self._batch_end = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self.waiting += now - self._batch_end
        self._batch_start = now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self._batch_start is not None:
            self.computing += now - self._batch_start
        self._batch_end = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_end = None  # validation time is neither waiting nor training

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_end = time.perf_counter()

    @property
    def share(self) -> float:
        total = self.waiting + self.computing
        return self.waiting / total if total else 0.0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("train/data_stall_share", self.share)
        log.info("epoch %d: %.1f%% of training time waiting for data", trainer.current_epoch, 100 * self.share)
