"""Converters, the shard writer, the validator and inspection tools (imports ``pipeline``)."""

from shard_tools.version import CONVERTER_VERSION
from shard_tools.write import Sample, write_shards

__version__ = CONVERTER_VERSION
__all__ = ["CONVERTER_VERSION", "Sample", "write_shards"]
