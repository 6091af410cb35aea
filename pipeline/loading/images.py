"""Each input's images as a batch needs them: raw pixels gathered from the shard, JPEG/PNG
decoded at full size (``torchvision.io``), or decoded at the size training needs by the
decode stage (:mod:`pipeline.loading.decode_stage`, when the input has a ``DecodeSpec``),
straight into the batch's slot where it can. A sample whose image does not decode is
reported as a :class:`BadImage` giving the reason; the assembler applies the error policy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from pipeline.errors import ShardFormatError
from pipeline.format.schema import ImageSpec
from pipeline.loading.decode_spec import DecodeSpec
from pipeline.loading.decode_stage import ImageDecodeError, decode_full_into, decode_into
from pipeline.loading.decoded import BatchRefs, DecodedShard, gather_rows
from pipeline.loading.inputs import ShardInput


class BadImage(ShardFormatError):
    """A sample's image does not decode, or has the wrong shape; the message is the reason
    (the assembler names the shard and key, and applies the error policy)."""


class InputImages:
    """The images of a loader's inputs (picklable): each input's stored spec and, if it has
    one, its decode spec."""

    def __init__(self, inputs: Sequence[ShardInput]) -> None:
        self.stored = tuple(put.schema.image for put in inputs)
        self.decode = tuple(put.decode for put in inputs)

    def output_shape(self) -> tuple[int, int, int] | None:
        """The (C, H, W) every input's images come out in without transforms, or None when
        the inputs differ (then transforms must give them one shape)."""
        shapes = {spec.shape if spec is not None else (stored.shape_chw if stored.fixed_size else None)
                  for stored, spec in zip(self.stored, self.decode, strict=True)}
        return shapes.pop() if len(shapes) == 1 else None

    def raw_only(self) -> bool:
        return all(spec.encoding == "raw" for spec in self.stored)

    def sample(self, shard: DecodedShard, i: int, u: np.ndarray) -> torch.Tensor:
        """Sample ``i``'s image as a (C, H, W) uint8 tensor (BadImage if it does not decode)."""
        stored, spec = self.stored[shard.source], self.decode[shard.source]
        if spec is not None:
            out = np.empty(spec.shape, dtype=np.uint8)
            self._decode_at_size(shard, i, spec, u, out)
            return torch.from_numpy(out)
        if stored.encoding == "raw":
            return raw_image(shard, i, stored)
        return self._decode_full(shard, i, stored)

    def into(self, shard: DecodedShard, i: int, u: np.ndarray, out: np.ndarray) -> None:
        """Sample ``i``'s image into ``out``, one (C, H, W) slot of a batch (BadImage if it
        does not decode); JPEG/PNG images are decoded straight into it (at a decode spec's
        size, or RGB images of a fixed size at their own)."""
        spec, stored = self.decode[shard.source], self.stored[shard.source]
        if spec is not None:
            self._decode_at_size(shard, i, spec, u, out)
        elif stored.encoding != "raw" and stored.fixed_size and stored.channels == 3:
            self._decode_stored_size(shard, i, stored, out)
        else:
            np.copyto(out, self.sample(shard, i, u).numpy())

    def _decode_at_size(self, shard: DecodedShard, i: int, spec: DecodeSpec, u: np.ndarray, out: np.ndarray) -> None:
        stored = self.stored[shard.source]
        data = shard.index.member(stored.encoding, i)
        if data is None:
            raise BadImage(f"{stored.encoding}: missing image member")
        try:
            decode_into(data, spec, u, out)
        except ImageDecodeError as e:
            raise BadImage(f"{stored.encoding}: {e}") from e

    @staticmethod
    def _decode_stored_size(shard: DecodedShard, i: int, stored: ImageSpec, out: np.ndarray) -> None:
        data = shard.index.member(stored.encoding, i)
        if data is None:
            raise BadImage(f"{stored.encoding}: missing image member")
        try:
            decode_full_into(data, out)
        except ImageDecodeError as e:
            raise BadImage(f"{stored.encoding}: {e}") from e

    @staticmethod
    def _decode_full(shard: DecodedShard, i: int, stored: ImageSpec) -> torch.Tensor:
        data = shard.index.member(stored.encoding, i)
        mode = ImageReadMode.GRAY if stored.channels == 1 else ImageReadMode.RGB
        try:
            image = decode_image(torch.frombuffer(bytearray(data or b""), dtype=torch.uint8), mode=mode)
        except (RuntimeError, ValueError) as e:
            raise BadImage(f"{stored.encoding}: image does not decode ({e})") from e
        found = tuple(image.shape) if stored.fixed_size else image.shape[0]
        if found != (stored.shape_chw if stored.fixed_size else stored.channels):
            expected = stored.shape_chw if stored.fixed_size else f"{stored.channels} channels"
            raise BadImage(f"{stored.encoding}: image expected CxHxW {expected}, found {tuple(image.shape)}")
        return image


def raw_image(shard: DecodedShard, i: int, spec: ImageSpec) -> torch.Tensor:
    """Sample ``i``'s raw pixels as CHW, by its own input's image spec."""
    pixels = torch.frombuffer(bytearray(gather_rows(shard, np.asarray([i]), spec.nbytes)), dtype=torch.uint8)
    if spec.layout == "HWC":
        return pixels.view(spec.height, spec.width, spec.channels).permute(2, 0, 1)  # type: ignore[arg-type]
    return pixels.view(spec.shape_chw)


def gather_pixels(refs: BatchRefs, spec: ImageSpec, out: np.ndarray) -> None:
    """Raw pixels of a batch whose inputs all store ``spec`` into ``out`` (n, nbytes), as CHW."""
    for shard, at, rows in refs.groups():
        out[at] = shard.pixels[rows] if shard.pixels is not None else gather_rows(shard, rows, spec.nbytes)
    if spec.layout == "HWC":
        channels, height, width = spec.shape_chw
        hwc = out.reshape(len(refs), height, width, channels)
        out[:] = hwc.transpose(0, 3, 1, 2).reshape(len(refs), -1)
