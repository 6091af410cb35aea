"""A Lightning callback for fault tests: appends the sample keys of every trained batch to a file.

Used from a training subprocess by Hydra (``+callbacks.keys._target_=tests.key_recorder.KeyRecorder
+callbacks.keys.path=...``; the batches must carry their keys: ``+data.with_keys=true``). One
JSON line per batch, written and flushed once the batch's optimizer step is done, so that a
process killed with SIGKILL leaves exactly the batches it trained (the kernel keeps what
``write`` was given even if the process dies right after).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import lightning as L


class KeyRecorder(L.Callback):
    """Writes ``{"epoch", "batch_idx", "global_step", "keys"}`` per trained batch to ``path``;
    ``delay`` seconds of sleep before each batch slow training down (so that a test can kill
    the process between two given steps)."""

    def __init__(self, path: str, delay: float = 0.0) -> None:
        self.path, self.delay = path, float(delay)
        self._fd: int | None = None

    def _write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self._fd, (json.dumps(record) + "\n").encode())  # one write per line: never half a line

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write({"event": "start", "pid": os.getpid(), "global_step": trainer.global_step})

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.delay:
            time.sleep(self.delay)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        keys = batch[2] if isinstance(batch, (tuple, list)) and len(batch) > 2 else None
        if keys is None:
            raise RuntimeError("KeyRecorder: the batches carry no keys; set data.with_keys=true")
        self._write({"epoch": trainer.current_epoch, "batch_idx": batch_idx, "global_step": trainer.global_step,
                     "keys": [str(k) for k in keys]})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write({"event": "end", "global_step": trainer.global_step})
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
