"""The bottom layer: schema, shard header, manifests, label encoding, readers and stages."""

from pipeline.errors import (
    ConversionError,
    HeaderMismatchError,
    ManifestError,
    PipelineError,
    SchemaError,
    ShardFormatError,
)
from pipeline.header import HEADER_MEMBER, read_header
from pipeline.manifest import MANIFEST_NAME, Manifest, ShardInfo, read_manifest
from pipeline.schema import DatasetSchema, FixedParameter, Head, ImageSpec, Provenance

__all__ = [
    "HEADER_MEMBER", "MANIFEST_NAME", "ConversionError", "DatasetSchema", "FixedParameter", "Head",
    "HeaderMismatchError", "ImageSpec", "Manifest", "ManifestError", "PipelineError",
    "Provenance", "SchemaError", "ShardFormatError", "ShardInfo", "read_header", "read_manifest",
]


def __getattr__(name: str) -> object:
    """``make_loader``, ``mix`` and ``ShardLoader`` import torch: load them only when asked for."""
    if name in ("make_loader", "read_schema"):
        from pipeline import api

        return getattr(api, name)
    if name in ("mix", "MixSource"):
        from pipeline import mix_loader

        return getattr(mix_loader, name)
    if name == "ShardLoader":
        from pipeline.loader import ShardLoader

        return ShardLoader
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ += ["MixSource", "ShardLoader", "make_loader", "mix", "read_schema"]
