"""MixDataModule: train on a weighted mix of shard sets (``pipeline.mix``), evaluate on each
source's evaluation split, every sample once.

The model is built from the mix's union schema: every head of every source plus the
``dataset`` head; a sample's missing heads are class -1, left out of losses and metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L

from pipeline import DatasetSchema, ImageSpec, SchemaError
from pipeline.batching import Transform
from pipeline.loader import ShardLoader, default_world
from pipeline.mix_loader import MixSource, mix
from training.datamodule import LightningLoader, MultiheadDataModule

EVAL_KEYS = ("val_split", "test_split")


class MixDataModule(MultiheadDataModule):
    """``sources``: one mapping per source with :class:`~pipeline.mix_loader.MixSource`'s
    fields (``source``, ``split``, ``weight`` | ``repeat`` | ``choose``, ``name``,
    ``storage_options``, ``transform``: run on that source's images in every split, before
    ``train_transform``/``eval_transform``) plus
    ``val_split`` and ``test_split`` (default ``test``). ``epoch_samples``: the size of a
    training epoch (default: all sources' train splits summed)."""

    def __init__(self, sources: Sequence[Mapping[str, Any]], *, epoch_samples: int | None = None,
                 batch_size: int = 256, eval_batch_size: int | None = None, num_workers: int = 2, seed: int = 0,
                 shuffle_buffer: int = 4096, drop_last: bool = False, on_error: str = "raise",
                 storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
                 with_keys: bool = False, image_size: int | None = None,
                 train_transform: Transform | None = None, eval_transform: Transform | None = None) -> None:
        L.LightningDataModule.__init__(self)
        self.train_sources = [MixSource(**{k: v for k, v in s.items() if k not in EVAL_KEYS}) for s in sources]
        self.eval_splits = [{k: str(s.get(k, "test")) for k in EVAL_KEYS} for s in sources]
        self.epoch_samples = epoch_samples
        self._settings(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
                       shuffle_buffer=shuffle_buffer, drop_last=drop_last, on_error=on_error,
                       storage_options=storage_options, cache_dir=cache_dir, with_keys=with_keys,
                       image_size=image_size, train_transform=train_transform, eval_transform=eval_transform)
        loader = self._mix(self.train_sources, train=True)  # reads every header now
        self._train_loader: ShardLoader | None = loader
        self.schema: DatasetSchema = loader.schema
        self.input_image = self._input_image(image_size)

    def _input_image(self, image_size: int | None) -> ImageSpec:
        """``image_size`` squares if set, else what the sources' own transforms were found
        to give (see ``mix``), else the stored images."""
        shape = self._train_loader.image_shape if self._train_loader is not None else None
        if image_size is None and shape is not None and len(shape) == 3:
            return ImageSpec(height=shape[1], width=shape[2], channels=shape[0])
        return super()._input_image(image_size)

    def _mix(self, sources: Sequence[MixSource], *, train: bool) -> ShardLoader:
        return mix(sources, batch_size=self.batch_size if train else self.eval_batch_size,
                   epoch_samples=self.epoch_samples if train else None, shuffle=train, seed=self.seed,
                   uneven="drop" if train else "pad",
                   shuffle_buffer=self.shuffle_buffer, drop_last=self.drop_last and train,
                   transform=self.train_transform if train else self.eval_transform, **self.options)

    def _eval_sources(self, stage: str) -> list[MixSource]:
        """Each source's ``stage`` split (``train``: its training split), every sample once (``repeat=1``)."""
        return [MixSource(s.source, split=s.split if stage == "train" else splits[f"{stage}_split"], repeat=1.0,
                          name=name, storage_options=s.storage_options, transform=s.transform)
                for s, splits, name in zip(self.train_sources, self.eval_splits,
                                           self.schema.head("dataset").class_names, strict=True)]

    def check_split(self, stage: str) -> DatasetSchema:
        """The union schema of a stage's splits; its heads must be the training mix's."""
        return self._same_heads(self._mix(self._eval_sources(stage), train=False).schema, f"{stage} splits of the mix")

    def train_dataloader(self) -> LightningLoader:
        """The train mix, planned for the process group as it is now: the loader built with
        the datamodule (before ``fit`` started DDP) is reused only if the world is the same."""
        built, self._train_loader = self._train_loader, None
        config = built.stream.config if built is not None else None
        if config is None or (config.world_size, config.rank) != default_world():
            built = self._mix(self.train_sources, train=True)
        self._train = built
        return self._resumed(built)

    def eval_dataloader(self, stage: str) -> LightningLoader:
        """Every source's split of ``stage`` (``train``, ``val`` or ``test``), every sample once."""
        if stage not in ("train", "val", "test"):
            raise SchemaError(f"stage: expected one of ['test', 'train', 'val'], found {stage!r}")
        loader = self._mix(self._eval_sources(stage), train=False)
        self._same_heads(loader.schema, f"{stage} splits of the mix")
        return LightningLoader(loader)
