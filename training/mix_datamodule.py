"""MixDataModule: train on a weighted mix of shard sets (``pipeline.mix``), evaluate on each
source's evaluation split, every sample once.

The model is built from the mix's union schema: every head of every source plus the
``dataset`` head; a sample's missing heads are class -1, left out of losses and metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from pipeline import MixSource, ShardLoader, Transform, mix, read_schema
from pipeline.io.disk_cache import DEFAULT_LIMIT
from pipeline.mixing.transforms import Chain
from training.shard_datamodule import DecodeSettings, LoaderSettings, ShardDataModule

EVAL_KEYS = ("val_split", "test_split")


class MixDataModule(ShardDataModule):
    """``sources``: one mapping per source with :class:`~pipeline.MixSource`'s fields
    (``source``, ``split``, ``weight`` | ``repeat`` | ``choose``, ``name``,
    ``storage_options``, ``transform``: run on that source's images in every split, before
    ``train_transform``/``eval_transform``; ``decode``: that source's own decode spec, in
    every split) plus ``val_split`` and ``test_split`` (default ``test``). With ``decode``
    (:class:`DecodeSettings`), the JPEG/PNG sources without their own spec are decoded at
    its size and the others go through the transforms. ``epoch_samples``: the size of a
    training epoch (default: all sources' train splits summed)."""

    def __init__(self, sources: Sequence[Mapping[str, Any]], *, epoch_samples: int | None = None,
                 batch_size: int = 256, eval_batch_size: int | None = None, num_workers: int = 2, seed: int = 0,
                 shuffle_buffer: int = 4096, drop_last: bool = False, on_error: str = "raise",
                 storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
                 cache_limit: int = DEFAULT_LIMIT, with_keys: bool = False, image_size: int | None = None,
                 train_transform: Transform | None = None, eval_transform: Transform | None = None,
                 decode: DecodeSettings | Mapping[str, Any] | None = None) -> None:
        self.train_sources = [MixSource(**{k: v for k, v in s.items() if k not in EVAL_KEYS}) for s in sources]
        self.eval_splits = [{k: str(s.get(k, "test")) for k in EVAL_KEYS} for s in sources]
        self.epoch_samples = epoch_samples
        settings = LoaderSettings(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                                  seed=seed, shuffle_buffer=shuffle_buffer, drop_last=drop_last, on_error=on_error,
                                  storage_options=storage_options, cache_dir=cache_dir, cache_limit=cache_limit,
                                  with_keys=with_keys)
        super().__init__(settings, image_size=image_size, train_transform=train_transform,
                         eval_transform=eval_transform, decode=decode)

    def build_train(self) -> ShardLoader:
        sources = [self._with_images(s, train=True) for s in self.train_sources]
        return mix(sources, epoch_samples=self.epoch_samples, **self.loader_options(train=True))

    def _with_images(self, source: MixSource, train: bool) -> MixSource:
        """``source`` with what makes its images the model's: its own decode spec, else the
        module's decode spec (JPEG/PNG) or transform, after its own transform."""
        if source.decode is not None:
            return source
        schema = None
        if self.decode is not None:
            options = self.settings.storage_options if source.storage_options is None else dict(source.storage_options)
            schema = read_schema(source.source, split=source.split, storage_options=options)
        images = self.image_options(schema, train)
        transform = images["transform"]
        return replace(source, decode=images["decode"],
                       transform=Chain(source.transform, transform) if source.transform and transform
                       else source.transform or transform)

    def build_eval(self, stage: str) -> ShardLoader:
        """Each source's ``stage`` split (``train``: its training split), every sample once
        (``repeat=1``), under the name it has in the training mix."""
        names = self.schema.head("dataset").class_names
        sources = [MixSource(s.source, split=s.split if stage == "train" else splits[f"{stage}_split"], repeat=1.0,
                             name=name, storage_options=s.storage_options, transform=s.transform, decode=s.decode)
                   for s, splits, name in zip(self.train_sources, self.eval_splits, names, strict=True)]
        sources = [self._with_images(s, train=False) for s in sources]
        return mix(sources, **self.loader_options(train=False))

    def describe(self, stage: str) -> str:
        return f"{stage} splits of the mix"
