"""Converters, the shard writer, the validator and inspection tools (imports ``pipeline``)."""

__version__ = "0.2.0"
