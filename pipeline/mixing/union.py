"""The schema of a mix: every head of every source, plus a ``dataset`` head.

A head name that more than one source uses is namespaced as ``<source>_<head>`` in each of
them (two heads called ``label`` rarely mean the same thing); other names stay as they are.
The ``dataset`` head is a class head whose classes are the source names: which source a
sample came from. :class:`HeadMap` says, per union head, which head of each source fills it
(None: the source lacks it, and its samples carry the missing marker, class ``-1``).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from pipeline.errors import SchemaError
from pipeline.format.schema import DatasetSchema, Head, ImageSpec, Provenance
from pipeline.loading.decoded import DecodedShard

log = logging.getLogger(__name__)

MISSING_CLASS = -1  # the label of a head a sample's source does not have (values: NaN)
DATASET_HEAD = "dataset"


@dataclass(frozen=True)
class HeadMap:
    """``heads[name][k]``: the head of source ``k`` behind union head ``name``, or None."""

    heads: dict[str, tuple[str | None, ...]]
    dataset_head: str


def source_name(text: str) -> str:
    """A source name usable in head names: an identifier made of ``text``."""
    name = re.sub(r"\W+", "_", text).strip("_")
    return name if name and name[0].isalpha() else f"s_{name}"


def union_image(schemas: Sequence[DatasetSchema], names: Sequence[str], resized: bool) -> ImageSpec:
    """The common image spec, or (with ``resized``: a transform gives every image one size)
    a varying one; otherwise an error that names both differing specs."""
    first = schemas[0].image
    for name, schema in zip(names[1:], schemas[1:], strict=True):
        spec = schema.image
        if spec.channels != first.channels:
            raise SchemaError(f"mix: source {names[0]!r} has {first.channels}-channel images "
                              f"({first.describe()}), source {name!r} {spec.channels}-channel "
                              f"({spec.describe()}); a mix needs one channel count")
        if spec != first and not resized:
            raise SchemaError(f"mix: source {names[0]!r} has images {first.describe()}, source {name!r} has images "
                              f"{spec.describe()}; set a target size (image_size, or a transform that "
                              "gives every image one size) to mix them")
    if all(s.image == first for s in schemas):
        return first
    return ImageSpec(height=None, width=None, channels=first.channels, encoding="png")


def union_schema(schemas: Sequence[DatasetSchema], names: Sequence[str], *, split: str,
                 resized: bool = False, dataset_head: str = DATASET_HEAD) -> tuple[DatasetSchema, HeadMap]:
    """The mixed schema and where each of its heads comes from."""
    if len(set(names)) != len(names):
        raise SchemaError(f"mix: source names must differ, found {list(names)}")
    uses = Counter(h.name for s in schemas for h in s.heads)
    uses[dataset_head] += 1  # a source head called 'dataset' is namespaced too
    heads: list[Head] = []
    mapping: dict[str, tuple[str | None, ...]] = {}
    for k, (schema, name) in enumerate(zip(schemas, names, strict=True)):
        for head in schema.heads:
            union_name = f"{name}_{head.name}" if uses[head.name] > 1 else head.name
            if union_name in mapping:
                raise SchemaError(f"mix: head {union_name!r} of source {name!r} clashes with another head of "
                                  "the mix; rename the source")
            described = f"{name}: {head.description}" if head.description else f"from source {name!r}"
            heads.append(replace(head, name=union_name, description=described))
            mapping[union_name] = tuple(head.name if j == k else None for j in range(len(schemas)))
    heads.append(Head(name=dataset_head, kind="class", num_classes=len(names), class_names=tuple(names),
                      description="which source of the mix a sample came from"))
    mapping[dataset_head] = (None,) * len(schemas)
    schema = DatasetSchema(name="mix(" + "+".join(names) + ")", split=split,
                           image=union_image(schemas, names, resized), heads=tuple(heads),
                           provenance=Provenance(source_format="mix", source_name=",".join(s.name for s in schemas)))
    return schema, HeadMap(mapping, dataset_head)


@dataclass(frozen=True)
class ToUnion:
    """A source's decoded shard with its label columns renamed into the union schema: heads
    the source lacks carry the missing marker (class -1, value NaN), the dataset head says
    which source it is (picklable: the loader's ``relabel`` of each mix source)."""

    union: DatasetSchema
    head_map: HeadMap
    source: int

    def __call__(self, shard: DecodedShard) -> DecodedShard:
        n, k = len(shard.index), self.source
        classes: dict[str, np.ndarray] = {}
        values: dict[str, np.ndarray] = {}
        for head in self.union.heads:
            own = self.head_map.heads[head.name][k]
            if head.name == self.head_map.dataset_head:
                classes[head.name] = np.full(n, k, dtype=np.int64)
            else:
                classes[head.name] = shard.classes[own] if own is not None else np.full(n, MISSING_CLASS, np.int64)
            if head.kind == "quantized":
                values[head.name] = shard.values[own] if own is not None else np.full(n, np.nan, dtype=np.float32)
        return DecodedShard(shard.index, classes, values, shard.problems, shard.pixels, k)
