"""No worker outlives its parent: worker processes ask the kernel to kill them when the
process that started them dies (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``).

PyTorch's DataLoader workers check for a dead parent only between items, and a pool worker
of a conversion only between jobs, so a worker busy with a long item (or stuck) would go on
at full speed after its parent was killed. The death signal is tied to the parent *thread*
that started the worker, so it is set only for workers started from the main thread (a
loader iterated from a short-lived thread keeps PyTorch's own check). Elsewhere than Linux
this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In a freshly started worker: be killed when the parent dies; exit at once if it
    already has (it died before the request took effect)."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return
    except (OSError, AttributeError) as e:  # no libc to call: keep the library's own checks
        log.debug("prctl unavailable (%s)", e)
        return
    if os.getppid() != parent_pid:
        os._exit(1)


@dataclass(frozen=True)
class DieWithParent:
    """A worker initializer (picklable) that calls :func:`die_with_parent` for the process
    that made it, when that process made it on its main thread."""

    parent_pid: int = field(default_factory=os.getpid)
    main_thread: bool = field(default_factory=lambda: threading.current_thread() is threading.main_thread())

    def __call__(self, *args: object) -> None:
        if self.main_thread:
            die_with_parent(self.parent_pid)
