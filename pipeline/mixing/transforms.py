"""Transforms of a mix's images: each source's own, then the mix's (:class:`Chain`), checked
when the mix is built on a blank image of each source's size, so that sources that would
come out in different shapes fail now, naming them, not in a worker."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.errors import SchemaError
from pipeline.format.schema import DatasetSchema
from pipeline.loading.inputs import Transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chain:
    """``then(first(image))``, either of them possibly None (picklable)."""

    first: Transform | None
    then: Transform | None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for step in (self.first, self.then):
            if step is not None:
                image = step(image)
        return image


PROBE_SIZES = ((37, 53), (64, 48))  # input sizes tried for a source whose images vary in size


def check_transform_sizes(transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                          schemas: Sequence[DatasetSchema], names: Sequence[str],
                          what: str = "the transform") -> tuple[int, ...] | None:
    """Run each source's ``transforms`` entry on blank images of its size (two odd sizes for
    a source whose sizes vary) and raise SchemaError, naming sources and shapes, if the
    outputs' shapes differ: batches would fail in a worker later. The one shape they give;
    None when a transform refuses a blank image (nothing is checked then). ``what`` names
    the transforms in the error."""
    shapes: dict[tuple[int, ...], str] = {}
    for transform, name, schema in zip(transforms, names, schemas, strict=True):
        spec = schema.image
        sizes = [(spec.height, spec.width)] if spec.height and spec.width else list(PROBE_SIZES)
        for height, width in sizes:
            try:
                out = transform(torch.zeros((spec.channels, height, width), dtype=torch.uint8))
            except (TypeError, ValueError, RuntimeError) as e:
                log.debug("mix: transform not checked on a blank image (%s)", e)
                return None
            shapes.setdefault(tuple(out.shape), f"source {name!r} ({height}x{width} in)")
    if len(shapes) > 1:
        found = "; ".join(f"{where}: {list(shape)}" for shape, where in shapes.items())
        raise SchemaError(f"mix: {what} gives images of {len(shapes)} shapes ({found}); it must give "
                          "every image one size, e.g. Resize((s, s)) or RandomResizedCrop(s)")
    return next(iter(shapes))
