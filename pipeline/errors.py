"""The error tree shared by every layer.

Every error names the thing that is wrong (file, shard, member or sample), says what
was expected and what was found. Catch :class:`PipelineError` to handle them all.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error this project raises on bad input."""


class SchemaError(PipelineError, ValueError):
    """A dataset schema (or the JSON it was read from) is invalid."""


class ShardFormatError(PipelineError):
    """A shard, its header or one of its members does not follow the shard format."""


class HeaderMismatchError(ShardFormatError):
    """Shards that must share one header (one split, one dataset) disagree."""


class ManifestError(ShardFormatError):
    """A manifest is missing, unreadable, or disagrees with the shards it lists."""


class ConversionError(PipelineError):
    """A source dataset cannot be converted: missing, truncated or inconsistent input."""


class ConfigError(PipelineError, ValueError):
    """A setting is out of its range or names something that does not exist."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, unreadable, refused (it would run code) or not this project's."""


QUOTE_LIMIT = 160  # characters of a found value shown in a message


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (with the full
    length said) so that a crafted 64 MB field gives a short line, not a 64 MB one."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters in all)"
