"""The converter version written into every shard header (``provenance.converter_version``):
bumped whenever the same input would give different shards."""

CONVERTER_VERSION = "0.2.0"
