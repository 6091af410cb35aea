"""Batches packed into one buffer: a group of consecutive batches crosses from a dataloader
worker to the main process as one shared-memory tensor (:class:`PackedGroup`), each field
a typed view (:func:`unpack`). Every head's classes are one ``(heads, B)`` block and the
quantized heads' values another, so labels are filled with one gather per shard."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

IMAGES = "images"
CLASSES, VALUES = "\0classes", "\0values"  # the label blocks' names inside a buffer
# name, torch dtype name, shape; a label block's name is (block name, row names): one row per head
Field = tuple["str | tuple[str, tuple[str, ...]]", str, tuple[int, ...]]


@dataclass
class PackedGroup:
    """Consecutive batches in one uint8 buffer: per batch ``(offset, size, fields, keys)``
    (see :func:`unpack`). One buffer crosses from a worker to the main process per group."""

    buffer: torch.Tensor
    parts: list[tuple[int, int, tuple[Field, ...], list[str]]]
    input_counts: np.ndarray  # samples per input of the loader in these batches
    slot: tuple[int, int] | None = None  # the worker's reusable buffer it lies in (pipeline.loading.hand_off)

    def pin_memory(self) -> PackedGroup:
        """The group in page-locked memory (``DataLoader(pin_memory=True)`` calls this)."""
        return PackedGroup(self.buffer.pin_memory(), self.parts, self.input_counts, self.slot)

    def batches(self) -> list[tuple[dict[str, torch.Tensor], list[str]]]:
        """Each batch's fields as typed views, with its keys."""
        return [(unpack(self.buffer[offset:offset + size], fields), keys) for offset, size, fields, keys in self.parts]


@functools.lru_cache(maxsize=256)
def _field_sizes(fields: tuple[Field, ...]) -> list[tuple[int, int]]:
    """(offset, nbytes) of each field, each starting 8-byte aligned."""
    spans, offset = [], 0
    for _, dtype, shape in fields:
        nbytes = math.prod(shape) * getattr(torch, dtype).itemsize
        spans.append((offset, nbytes))
        offset += -(-nbytes // 8) * 8
    return spans


def packed_size(fields: tuple[Field, ...]) -> int:
    """Bytes a batch with these fields takes in a buffer (a multiple of 8)."""
    spans = _field_sizes(fields)
    total = spans[-1][0] + spans[-1][1] if spans else 0
    return -(-total // 8) * 8


def field_views(buffer: torch.Tensor, fields: tuple[Field, ...]) -> dict[str, torch.Tensor]:
    """Typed views of a packed buffer's fields (label blocks whole, by block name)."""
    out = {}
    for (name, dtype, shape), (offset, nbytes) in zip(fields, _field_sizes(fields), strict=True):
        out[name if isinstance(name, str) else name[0]] = \
            buffer[offset:offset + nbytes].view(getattr(torch, dtype)).view(shape)
    return out


def unpack(buffer: torch.Tensor, fields: tuple[Field, ...]) -> dict[str, torch.Tensor]:
    """Typed views of a packed buffer's fields; each label block's rows by head name."""
    out = {}
    for (name, dtype, shape), (offset, nbytes) in zip(fields, _field_sizes(fields), strict=True):
        view = buffer[offset:offset + nbytes].view(getattr(torch, dtype)).view(shape)
        if isinstance(name, str):
            out[name] = view
        else:
            out.update(zip(name[1], view.unbind(0), strict=True))
    return out
