"""A cache of loaded source files that keeps only each file's latest state.

Converters load a whole split file (a 310 MB CIFAR pickle) once per process and key the
result on the file's ``stat_key``, so a changed file is loaded again. ``functools.lru_cache``
keyed that way keeps the old contents too until they age out: in a long-lived process (a
notebook, a benchmark) every state of the file ever seen, each a full copy, and each
``fork`` of a worker pool then copies page tables for all of them. Here a file's old
contents are dropped before its new state is loaded.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

R = TypeVar("R")


def latest_per_file(identity: Callable[..., Hashable], size: int = 4) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Cache a loader's result per ``identity(*args)`` (which file it loads), keeping only
    the call with the latest arguments (which state of it) and at most ``size`` files, the
    least recently used dropped first. Arguments are positional and hashable."""

    def wrap(load: Callable[..., R]) -> Callable[..., R]:
        entries: OrderedDict[Hashable, tuple[tuple[Any, ...], R]] = OrderedDict()

        @functools.wraps(load)
        def cached(*args: Any) -> R:
            which = identity(*args)
            hit = entries.pop(which, None)  # a stale state is released before the new one loads
            if hit is not None and hit[0] == args:
                entries[which] = hit
                return hit[1]
            value = load(*args)
            entries[which] = (args, value)
            while len(entries) > size:
                entries.popitem(last=False)
            return value

        return cached

    return wrap
