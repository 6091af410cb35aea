"""MultiheadDataModule: train/val/test splits streamed by ``pipeline.make_loader``.

The schema is read when the module is built, so the model can size its heads from it
and unreachable or missing shards fail before training starts. The train loader's place
in its epoch is saved in Lightning checkpoints (``state_dict``) as the number of batches
trained, so a resumed run continues with the next batch of the same epoch order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L

from pipeline import DatasetSchema, ImageSpec, SchemaError, make_loader, read_schema
from pipeline.batching import Transform
from pipeline.loader import ShardLoader

log = logging.getLogger(__name__)
Source = str | Sequence[str]


def default_transforms(size: int, *, train: bool) -> Transform:
    """torchvision v2 transforms to ``size`` x ``size``: a random resized crop and flip for
    training, resize and centre crop for evaluation. Images stay uint8."""
    from torchvision.transforms import v2

    if train:
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])


class _EpochSetter:
    """Lightning calls ``sampler.set_epoch(epoch)`` on every train loader before an epoch."""

    def __init__(self, loader: ShardLoader) -> None:
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)


class LightningLoader:
    """A ShardLoader as Lightning sees it: iterable, sized, told the epoch."""

    def __init__(self, loader: ShardLoader) -> None:
        self.loader = loader
        self.sampler = _EpochSetter(loader)
        self.batch_sampler = None  # Lightning looks for samplers here; there are none to replace

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        """Empty: the datamodule saves the train position as batches *trained*, which Lightning's
        one-batch prefetch makes differ from the batches this loader has handed out."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore here; see :meth:`MultiheadDataModule.load_state_dict`."""


class MultiheadDataModule(L.LightningDataModule):
    """Shards for training and evaluation; ``val``/``test`` default to ``train``'s source."""

    def __init__(self, train: Source, val: Source | None = None, test: Source | None = None, *,
                 train_split: str = "train", val_split: str = "test", test_split: str = "test",
                 batch_size: int = 256, eval_batch_size: int | None = None, num_workers: int = 2,
                 seed: int = 0, shuffle_buffer: int = 4096, drop_last: bool = False, on_error: str = "raise",
                 storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
                 with_keys: bool = False, image_size: int | None = None,
                 train_transform: Transform | None = None, eval_transform: Transform | None = None) -> None:
        super().__init__()
        self.sources = {"train": (train, train_split), "val": (val or train, val_split),
                        "test": (test or train, test_split)}
        self._settings(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
                       shuffle_buffer=shuffle_buffer, drop_last=drop_last, on_error=on_error,
                       storage_options=storage_options, cache_dir=cache_dir, with_keys=with_keys,
                       image_size=image_size, train_transform=train_transform, eval_transform=eval_transform)
        self.schema: DatasetSchema = read_schema(train, split=train_split, storage_options=storage_options)
        self.input_image = self._input_image(image_size)

    def _settings(self, *, batch_size: int, eval_batch_size: int | None, num_workers: int, seed: int,
                  shuffle_buffer: int, drop_last: bool, on_error: str, storage_options: dict[str, Any] | None,
                  cache_dir: str | None, with_keys: bool, image_size: int | None,
                  train_transform: Transform | None, eval_transform: Transform | None) -> None:
        """The loader settings every datamodule shares (``image_size``: default transforms)."""
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.options = {"num_workers": num_workers, "storage_options": storage_options, "cache_dir": cache_dir,
                        "on_error": on_error, "with_keys": with_keys}
        self.seed, self.shuffle_buffer, self.drop_last = seed, shuffle_buffer, drop_last
        if image_size is not None:
            train_transform = train_transform or default_transforms(image_size, train=True)
            eval_transform = eval_transform or default_transforms(image_size, train=False)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self._resume: dict[str, int] | None = None
        self._train: ShardLoader | None = None

    def _same_heads(self, schema: DatasetSchema, what: str) -> DatasetSchema:
        """``schema``, whose heads must be the training data's (else SchemaError naming ``what``)."""
        if [h.to_dict() for h in schema.heads] != [h.to_dict() for h in self.schema.heads]:
            raise SchemaError(f"{what}: heads {list(schema.head_names)} differ from the training data's "
                              f"{list(self.schema.head_names)}")
        return schema

    def _input_image(self, image_size: int | None) -> ImageSpec:
        """What the model sees: the stored images, or ``image_size`` squares after the transforms."""
        spec = self.schema.image
        if image_size is None:
            if not spec.fixed_size:
                raise SchemaError(f"the images of {self.schema.name!r} vary in size; set image_size (and, if "
                                  "you like, train_transform/eval_transform) so that the model sees one size")
            return spec
        return ImageSpec(image_size, image_size, spec.channels)

    def check_split(self, stage: str) -> DatasetSchema:
        """The schema of a stage's split; its heads must be the training split's."""
        source, split = self.sources[stage]
        schema = read_schema(source, split=split, storage_options=self.options["storage_options"])
        return self._same_heads(schema, f"{stage} split {split!r} of {source}")

    def train_dataloader(self) -> LightningLoader:
        source, split = self.sources["train"]
        self._train = make_loader(source, split=split, batch_size=self.batch_size, shuffle=True, seed=self.seed,
                                  shuffle_buffer=self.shuffle_buffer, drop_last=self.drop_last,
                                  transform=self.train_transform, **self.options)
        return self._resumed(self._train)

    def _resumed(self, loader: ShardLoader) -> LightningLoader:
        """The train loader, moved to the checkpoint's place in its epoch if resuming."""
        if self._resume is not None:
            state = {**loader.state_dict(), **self._resume}
            loader.load_state_dict(state)
            log.info("train loader resumes at epoch %d after %d batches", state["epoch"], state["batches_done"])
            self._resume = None
        return LightningLoader(loader)

    def eval_dataloader(self, stage: str) -> LightningLoader:
        """The split of ``stage`` (``train``, ``val`` or ``test``) for evaluation: every sample
        once, in order, with the eval transform; its heads must be the training split's."""
        if stage not in self.sources:
            raise SchemaError(f"stage: expected one of {sorted(self.sources)}, found {stage!r}")
        self.check_split(stage)
        source, split = self.sources[stage]
        return LightningLoader(make_loader(source, split=split, batch_size=self.eval_batch_size, shuffle=False,
                                           uneven="pad", transform=self.eval_transform, **self.options))

    def val_dataloader(self) -> LightningLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> LightningLoader:
        return self.eval_dataloader("test")

    def state_dict(self) -> dict[str, Any]:
        """Where the train loader is: the epoch and how many of its batches were trained."""
        trainer = self.trainer
        if trainer is None or self._train is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume = {"epoch": int(state_dict["epoch"]), "batches_done": int(state_dict["batches_done"])}
