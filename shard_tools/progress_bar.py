"""The progress bar of long shard work: tqdm without its monitor thread.

tqdm starts a monitor thread with its first bar (even a disabled one) and keeps it. The
converters fork worker pools while a bar is open, and forking a process that runs other
threads is unsafe (a lock held by the other thread stays held in the child; Python 3.12
warns about it). The monitor only adjusts the refresh rate of bars that stall, which these
bars do not need.
"""

from __future__ import annotations

from tqdm import tqdm


class ProgressBar(tqdm):
    """:class:`tqdm.tqdm` that never starts the monitor thread."""

    monitor_interval = 0
