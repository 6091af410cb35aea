"""Quiet library notices a user of ``train``/``evaluate`` cannot act on.

Only the entry points call :func:`quiet_library_notices`; library code and tests see every
warning. Each filter names one message: Lightning's tips (litlogger, litmodels) and its notices about
``limit_*_batches`` and ``log_every_n_steps``, the deprecation of torchvision's image
decoding (which the loader uses, see docs/loader.md) and of torch's ``LeafSpec`` (used by
Lightning). Everything else, the project's own messages and every error, still shows.
"""

from __future__ import annotations

import logging
import re
import warnings

# (message regex, category) of warnings; the regex must match the start of the message
_WARNINGS = (
    (r"The image decoding and encoding capabilities of TorchVision are deprecated", DeprecationWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"The number of training batches \(\d+\) is smaller than the logging interval", UserWarning),
)
# messages Lightning logs through its rank-zero loggers
_LOGGED = re.compile(r"💡 Tip: |`Trainer\(limit_\w+_batches=[\d.]+\)` was configured so ")
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropNotices(logging.Filter):
    """Drops the log records of Lightning's notices in ``_LOGGED``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _LOGGED.search(record.getMessage())


def quiet_library_notices() -> None:
    """Install the warning filters and logging filters (idempotent); worker processes
    forked afterwards inherit the warning filters."""
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices())
