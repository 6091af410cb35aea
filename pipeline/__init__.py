"""The bottom layer, in four wings: ``format`` (the shard format, read and write side),
``io`` (storage and shard-set resolution), ``loading`` (planning, decoding, batching, the
loader) and ``mixing`` (several shard sets in one loader). The names a user needs are
here; ``make_loader``, ``mix`` and ``ShardLoader`` import torch, so they load on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    HeaderMismatchError,
    ManifestError,
    PipelineError,
    SchemaError,
    ShardFormatError,
)
from pipeline.format.header import HEADER_MEMBER
from pipeline.format.manifest import MANIFEST_NAME, Manifest, ShardInfo
from pipeline.format.schema import DatasetSchema, FixedParameter, Head, ImageSpec, Provenance, same_heads
from pipeline.io.reading import read_header, read_manifest

if TYPE_CHECKING:
    from pipeline.loading.decode_spec import DecodeSpec
    from pipeline.loading.decoded import value_key
    from pipeline.loading.inputs import Transform
    from pipeline.loading.loader import ShardLoader, default_world
    from pipeline.loading.make_loader import make_loader, read_schema
    from pipeline.mixing.mix import MixSource, mix

_LAZY = {"DecodeSpec": "pipeline.loading.decode_spec",
         "make_loader": "pipeline.loading.make_loader", "read_schema": "pipeline.loading.make_loader",
         "ShardLoader": "pipeline.loading.loader", "default_world": "pipeline.loading.loader",
         "Transform": "pipeline.loading.inputs", "value_key": "pipeline.loading.decoded",
         "mix": "pipeline.mixing.mix", "MixSource": "pipeline.mixing.mix"}

__all__ = [  # those in _LAZY load on first use
    "HEADER_MEMBER",
    "MANIFEST_NAME",
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "DatasetSchema",
    "DecodeSpec",
    "FixedParameter",
    "Head",
    "HeaderMismatchError",
    "ImageSpec",
    "Manifest",
    "ManifestError",
    "MixSource",
    "PipelineError",
    "Provenance",
    "SchemaError",
    "ShardFormatError",
    "ShardInfo",
    "ShardLoader",
    "Transform",
    "default_world",
    "make_loader",
    "mix",
    "read_header",
    "read_manifest",
    "read_schema",
    "same_heads",
    "value_key",
]


def __getattr__(name: str) -> object:
    """The names that import torch, loaded when first asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
