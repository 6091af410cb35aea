"""Backbones sized from the schema's image spec; each maps [B, C, H, W] to [B, out_features].

Configs name one with ``_partial_: true``; the module calls it with ``image=schema.image``.
The ConvNeXt-V2, ViT and EfficientNet backbones are timm's models with small settings for
CPU-sized images, not hand-written copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import timm
import torch
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipeline import ImageSpec, SchemaError


class Backbone(nn.Module):
    """A feature extractor that knows its output width."""

    out_features: int


class SimpleCNN(Backbone):
    """Conv-BN-ReLU blocks, each halving the resolution, then global average pooling."""

    def __init__(self, image: ImageSpec, widths: Sequence[int] = (32, 64, 128), dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = image.channels
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.out_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def image_size(image: ImageSpec) -> tuple[int, int]:
    """(height, width) of the images a backbone sees, which must have one size."""
    if image.height is None or image.width is None:
        raise SchemaError(f"a backbone needs images of one size, found {image.describe()}; set data.image_size")
    return image.height, image.width


def _patch(image: ImageSpec, coarse: int) -> int:
    """A stem stride that leaves enough resolution for the stages of small images."""
    side = min(image_size(image))
    return 1 if side <= 16 else (2 if side <= 64 else coarse)


class ConvNeXtV2(Backbone):
    """A small ConvNeXt-V2 (timm ConvNeXt with global response norm, no layer scale).
    Images smaller than its four stages need are resized up to that size first."""

    def __init__(self, image: ImageSpec, depths: Sequence[int] = (1, 1, 2, 1),
                 dims: Sequence[int] = (24, 48, 96, 192), drop_path_rate: float = 0.0) -> None:
        super().__init__()
        patch = _patch(image, 4)
        self.model = ConvNeXt(in_chans=image.channels, num_classes=0, depths=tuple(depths), dims=tuple(dims),
                              patch_size=patch, use_grn=True, ls_init_value=None, drop_path_rate=drop_path_rate)
        self.min_size = patch * 8
        self.out_features = int(dims[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:
            size = (max(x.shape[-2], self.min_size), max(x.shape[-1], self.min_size))
            x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.model(x)


class ViT(Backbone):
    """A small Vision Transformer (timm) whose patch grid fits the image."""

    def __init__(self, image: ImageSpec, patch_size: int = 4, dim: int = 128, depth: int = 4, heads: int = 4,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        height, width = image_size(image)
        patch = patch_size if height % patch_size == 0 and width % patch_size == 0 else 1
        self.model = VisionTransformer(img_size=(height, width), patch_size=patch,
                                       in_chans=image.channels, num_classes=0, embed_dim=dim, depth=depth,
                                       num_heads=heads, drop_path_rate=drop_path_rate)
        self.out_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class EfficientNet(Backbone):
    """An EfficientNet from timm; the default ``tinynet_e`` is the family's smallest scaling
    (about 2M parameters), ``efficientnet_b0`` and up for larger images."""

    def __init__(self, image: ImageSpec, variant: str = "tinynet_e", drop_rate: float = 0.0) -> None:
        super().__init__()
        self.model = timm.create_model(variant, pretrained=False, num_classes=0, in_chans=image.channels,
                                       drop_rate=drop_rate)
        self.out_features = int(cast(int, self.model.num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
