"""Converters, the shard writer, the validator and inspection tools (imports ``pipeline``)."""

from shard_tools.version import CONVERTER_VERSION

__version__ = CONVERTER_VERSION
