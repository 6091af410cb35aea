"""Confusion matrices of every head during ``trainer.test``, and their plots.

:class:`ConfusionMatrices` keeps one torchmetrics ``MulticlassConfusionMatrix`` per head
(labels < 0, a head the sample's dataset lacks, are ignored) fed with the predicted classes
``MultiheadModule.test_step`` returns. :func:`plot_confusion` draws one with torchmetrics'
plotting, rows normalized, its axes labelled with the head's class names or, for quantized
heads, the real value each class stands for; long axes show every k-th label.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import torch
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassConfusionMatrix

from pipeline import DatasetSchema, Head

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the file-only backend

MAX_TICKS = 20       # longer axes are thinned to about this many labels
MAX_ANNOTATED = 10   # cells carry their value up to this many classes


class ConfusionMatrices(L.Callback):
    """One confusion matrix per head of ``schema`` over a ``trainer.test`` run: ``counts[head]``
    after it (rows: true class, columns: predicted class)."""

    def __init__(self, schema: DatasetSchema) -> None:
        self.schema = schema
        self.metrics = {h.name: MulticlassConfusionMatrix(h.num_classes, ignore_index=-1) for h in schema.heads}
        self.counts: dict[str, torch.Tensor] = {}

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for metric in self.metrics.values():
            metric.to(pl_module.device)
            metric.reset()

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        labels = batch[1]
        for name, classes in outputs["classes"].items():
            self.metrics[name].update(classes, labels[name])

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counts = {name: metric.compute().cpu() for name, metric in self.metrics.items()}


def class_labels(head: Head) -> list[str]:
    """What each class of ``head`` is: its name, the real value it stands for (quantized
    heads: the class centre ``min + k*step``, or of byte ``k`` without a step), else its index."""
    if head.class_names:
        return list(head.class_names)
    if head.kind == "quantized" and head.min is not None and head.max is not None:
        if head.step is not None:
            return [f"{head.min + k * head.step:g}" for k in range(head.num_classes)]
        return [f"{head.real_value(k):.3g}" for k in range(head.num_classes)]
    return [str(k) for k in range(head.num_classes)]


def thinned_ticks(count: int, most: int = MAX_TICKS) -> list[int]:
    """Every k-th of ``count`` positions, k chosen so that at most about ``most`` remain."""
    every = max(1, math.ceil(count / most))
    return list(range(0, count, every))


def plot_confusion(counts: torch.Tensor, head: Head, title: str, path: Path) -> None:
    """A PNG of :func:`confusion_figure`."""
    fig = confusion_figure(counts, head, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_figure(counts: torch.Tensor, head: Head, title: str) -> Figure:
    """``counts`` drawn rows normalized (the share of each true class predicted as each class)."""
    n = head.num_classes
    shares = counts.float() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    side = min(12.0, 5.0 + n / 10)
    fig, ax = plt.subplots(figsize=(side + 1.2, side), constrained_layout=True)
    labels = class_labels(head)
    with warnings.catch_warnings():  # torchmetrics hands matplotlib a tensor, whose __array__ numpy 2 warns about
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        MulticlassConfusionMatrix(n).plot(val=shares, ax=ax, add_text=n <= MAX_ANNOTATED, labels=labels, cmap="Blues")
    ticks = thinned_ticks(n)
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90 if n > MAX_ANNOTATED else 45, fontsize=8)
    ax.set_yticks(ticks, [labels[i] for i in ticks], rotation=0, fontsize=8)
    for text in ax.texts:
        text.set_fontsize(8)
    ax.set(title=title, xlabel=f"predicted {head.name}", ylabel=f"true {head.name}")
    fig.colorbar(ax.images[0], ax=ax, label="share of the true class")
    return fig
