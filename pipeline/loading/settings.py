"""The loader settings every entry (``make_loader``, ``mix``) checks, in one place, before
anything is read: a bad setting is a :class:`ConfigError` naming it, never a failure in a
worker."""

from __future__ import annotations

from pipeline.errors import ConfigError

ERROR_POLICIES = ("raise", "skip")
UNEVEN_POLICIES = ("drop", "pad")


def check_loader_settings(*, batch_size: int, num_workers: int, shuffle_buffer: int, on_error: str, uneven: str,
                          world_size: int, rank: int) -> None:
    """Raise ConfigError naming the first setting out of its range."""
    ranges = (("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 1),
              ("world_size", world_size, 1))
    for name, value, least in ranges:
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"expected {name} >= {least} (an int), found {value!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank: expected 0..{world_size - 1}, found {rank!r}")
    for name, policy, allowed in (("on_error", on_error, ERROR_POLICIES), ("uneven", uneven, UNEVEN_POLICIES)):
        if policy not in allowed:
            raise ConfigError(f"{name}: expected one of {allowed}, found {policy!r}")
