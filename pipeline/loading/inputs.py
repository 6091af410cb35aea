"""What a loader reads: one or more :class:`ShardInput` (a shard set with its schema, its
storage options, a transform for its images and how its labels map into the batches'
schema) and an :class:`EpochPlanner` that says, each epoch, which samples each worker of
each rank reads. A single shard set is a loader of one input planned by
:class:`~pipeline.loading.planning.SinglePlanner`; a mix (:mod:`pipeline.mixing`) is
several inputs and its own planner (both :class:`~pipeline.loading.planning.EpochPlanner`).
The loader itself never asks which it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.format.schema import DatasetSchema
from pipeline.loading.decode_spec import DecodeSpec
from pipeline.loading.decoded import DecodedShard
from pipeline.loading.planning import Slice

Transform = Callable[[torch.Tensor], torch.Tensor]
Relabel = Callable[[DecodedShard], DecodedShard]  # a shard's labels in the batches' schema (picklable)


@dataclass(frozen=True)
class ShardInput:
    """One shard set a loader reads. ``shards`` are its whole shards with their sample
    counts (``Slice.source`` is the input's position); ``decode`` makes its JPEG/PNG images
    at the size training needs (the decode stage); ``transform`` runs on its images (uint8
    CxHxW tensors) before the loader's own; ``relabel`` maps its shards' label columns into
    the loader's schema (None: they are in it already)."""

    name: str
    schema: DatasetSchema
    shards: tuple[Slice, ...]
    storage_options: Mapping[str, Any] | None = None
    decode: DecodeSpec | None = None
    transform: Transform | None = None
    relabel: Relabel | None = None

    @property
    def num_samples(self) -> int:
        return sum(len(s) for s in self.shards)
