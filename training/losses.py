"""Per-head output layers and losses, chosen by head kind; labels < 0 are missing and masked."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import Head, SchemaError

QUANTIZED_LOSSES = ("ce", "ordinal", "regression")


class HeadLoss(nn.Module):
    """One head's output layer, loss and prediction rule.

    ``ce``: softmax over classes. ``ordinal``: K-1 cumulative binary logits (CORAL style),
    class = number of thresholds passed. ``regression``: one output, the real value scaled
    to [0, 1], class = nearest step. Samples whose class label is < 0 are left out."""

    def __init__(self, head: Head, in_features: int, mode: str) -> None:
        super().__init__()
        if mode not in QUANTIZED_LOSSES:
            raise SchemaError(f"quantized_loss: expected one of {QUANTIZED_LOSSES}, found {mode!r}")
        self.head = head
        self.mode = mode if head.kind == "quantized" else "ce"
        outputs = {"ce": head.num_classes, "ordinal": max(1, head.num_classes - 1), "regression": 1}[self.mode]
        self.layer = nn.Linear(in_features, outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layer(features)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, value: torch.Tensor | None) -> torch.Tensor:
        mask = target >= 0
        if not bool(mask.any()):
            return logits.sum() * 0.0  # keeps the graph, contributes nothing
        logits, target = logits[mask], target[mask]
        if self.mode == "ce":
            return F.cross_entropy(logits, target)
        if self.mode == "ordinal":
            thresholds = torch.arange(logits.shape[1], device=target.device)
            return F.binary_cross_entropy_with_logits(logits, (target[:, None] > thresholds).float())
        scaled = self._scaled(value[mask] if value is not None else self._class_value(target))
        return F.smooth_l1_loss(torch.sigmoid(logits[:, 0]), scaled, beta=0.05)

    def predict(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class index, real value or None) per sample."""
        if self.mode == "ce":
            classes = logits.argmax(dim=1)
        elif self.mode == "ordinal":
            classes = (torch.sigmoid(logits) > 0.5).sum(dim=1)
        else:
            value = self._unscaled(torch.sigmoid(logits[:, 0]))
            return self._class_of(value), value
        return classes, self._class_value(classes) if self.head.kind == "quantized" else None

    def _class_value(self, classes: torch.Tensor) -> torch.Tensor:
        """The real value a class stands for: ``min + class*step`` (or the byte's value)."""
        lo, hi, step = self.head.min or 0.0, self.head.max or 1.0, self.head.step
        if step is None:
            return lo + classes.float() / 255 * (hi - lo)
        return lo + classes.float() * step

    def _class_of(self, value: torch.Tensor) -> torch.Tensor:
        lo, hi, step = self.head.min or 0.0, self.head.max or 1.0, self.head.step
        scale = step if step is not None else (hi - lo) / 255
        return torch.floor((value - lo) / scale + 0.5).long().clamp(0, self.head.num_classes - 1)

    def _scaled(self, value: torch.Tensor) -> torch.Tensor:
        lo, hi = self.head.min or 0.0, self.head.max or 1.0
        return ((value - lo) / (hi - lo)).clamp(0, 1)

    def _unscaled(self, scaled: torch.Tensor) -> torch.Tensor:
        lo, hi = self.head.min or 0.0, self.head.max or 1.0
        return lo + scaled * (hi - lo)
