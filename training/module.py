"""MultiheadModule: one LightningModule for every dataset; its heads come from the schema."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, Metric
from torchmetrics.classification import MulticlassAccuracy

from pipeline import DatasetSchema, ImageSpec, SchemaError
from pipeline.format.schema import check_same_heads
from pipeline.loading.assembler import value_key
from training.backbones import Backbone
from training.losses import HeadLoss

STAGES = ("train", "val", "test")


class MultiheadModule(L.LightningModule):
    """A backbone plus one head per schema head. ``backbone``, ``optimizer`` and ``scheduler``
    are factories (Hydra ``_partial_``): ``backbone(image=schema.image)``,
    ``optimizer(params=...)``, ``scheduler(optimizer=...)``. ``image``: what the backbone
    sees (after the data's transforms; default the schema's). ``config``: the run's resolved
    configs as plain data (``{"model": ..., "data": ...}``), saved with the hyperparameters
    (as are the schema and ``image``) so that evaluation can rebuild the run from a checkpoint."""

    def __init__(self, schema: DatasetSchema | Mapping[str, Any], backbone: Callable[..., Backbone],
                 optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, loss_weights: Mapping[str, float] | None = None,
                 quantized_loss: str = "ce", image: ImageSpec | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.schema = schema if isinstance(schema, DatasetSchema) else DatasetSchema.from_dict(schema)
        weights = dict(loss_weights or {})
        unknown = sorted(set(weights) - set(self.schema.head_names))
        if unknown:
            raise SchemaError(f"loss_weights names heads {unknown} that dataset {self.schema.name!r} does not have; "
                              f"its heads: {list(self.schema.head_names)}")
        image = image or self.schema.image
        self.save_hyperparameters({"schema": self.schema.to_dict(), "loss_weights": weights,
                                   "quantized_loss": quantized_loss, "config": dict(config or {}),
                                   "image": {"height": image.height, "width": image.width,
                                             "channels": image.channels}})
        self.backbone = backbone(image=image)
        self.heads = nn.ModuleDict({h.name: HeadLoss(h, self.backbone.out_features, quantized_loss)
                                    for h in self.schema.heads})
        self.weights = {h.name: float(weights.get(h.name, 1.0)) for h in self.schema.heads}
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.accuracy = nn.ModuleDict({f"{stage}_{h.name}": MulticlassAccuracy(h.num_classes, ignore_index=-1,
                                                                               average="micro")
                                       for stage in STAGES for h in self.schema.heads})
        self.mae = nn.ModuleDict({f"{stage}_{h.name}": MeanAbsoluteError()
                                  for stage in STAGES for h in self.schema.heads if h.kind == "quantized"})

    def head(self, name: str) -> HeadLoss:
        return cast(HeadLoss, self.heads[name])

    def metric(self, kind: str, stage: str, head: str) -> Metric:
        """The ``accuracy`` or ``mae`` metric of ``head`` in ``stage``."""
        return cast(Metric, getattr(self, kind)[f"{stage}_{head}"])

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float().div(255).sub(0.5).div(0.25) if images.dtype == torch.uint8 else images
        features = self.backbone(x)
        return {name: head(features) for name, head in self.heads.items()}

    def losses(self, outputs: Mapping[str, torch.Tensor],
               labels: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each head's loss; samples with a missing label (class < 0) count for nothing."""
        return {name: self.head(name).loss(outputs[name], labels[name], labels.get(value_key(name)))
                for name in self.heads}

    def _step(self, batch: tuple[torch.Tensor, dict[str, torch.Tensor]],
              stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss and each head's predicted classes; updates and logs the stage's metrics."""
        images, labels = batch[0], batch[1]
        outputs = self(images)
        losses = self.losses(outputs, labels)
        total = sum(self.weights[name] * loss for name, loss in losses.items())
        predicted = {}
        for name in self.heads:
            classes, values = self.head(name).predict(outputs[name])
            predicted[name] = classes
            self.metric("accuracy", stage, name).update(classes, labels[name])
            mask = labels[name] >= 0
            if values is not None and value_key(name) in labels and bool(mask.any()):
                self.metric("mae", stage, name).update(values[mask], labels[value_key(name)][mask])
            self.log(f"{stage}/{name}_loss", losses[name], on_step=False, on_epoch=True, batch_size=len(images))
        self.log(f"{stage}/loss", total, on_step=stage == "train", on_epoch=True, prog_bar=True,
                 batch_size=len(images))
        return total, predicted  # type: ignore[return-value]

    def _epoch_end(self, stage: str) -> None:
        accuracies = []
        for head in self.schema.heads:
            accuracy = self.metric("accuracy", stage, head.name)
            if accuracy.update_count:
                value = accuracy.compute()
                accuracies.append(value)
                self.log(f"{stage}/{head.name}_acc", value, sync_dist=False)
            accuracy.reset()
            if head.kind == "quantized":
                mae = self.metric("mae", stage, head.name)
                if mae.update_count:
                    self.log(f"{stage}/{head.name}_mae", mae.compute())
                mae.reset()
        if accuracies:
            self.log(f"{stage}/mean_acc", torch.stack(accuracies).mean(), prog_bar=stage != "train")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """The loss and, under ``classes``, each head's predicted classes (for callbacks such
        as :class:`training.confusion.ConfusionMatrices`)."""
        loss, predicted = self._step(batch, "test")
        return {"loss": loss, "classes": predicted}

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "schema", None) is not None:
            check_same_heads(self.schema, datamodule.schema, f"dataset {datamodule.schema.name!r}", "the model")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer),
                                                         "interval": "epoch"}}
