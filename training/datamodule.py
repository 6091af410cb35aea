"""MultiheadDataModule: one shard set's train/val/test splits, streamed by ``pipeline.make_loader``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline import ShardLoader, Transform, make_loader, read_schema
from pipeline.io.disk_cache import DEFAULT_LIMIT
from training.shard_datamodule import STAGES, DecodeSettings, LoaderSettings, ShardDataModule

Source = str | Sequence[str]


class MultiheadDataModule(ShardDataModule):
    """Shards for training and evaluation; ``val``/``test`` default to ``train``'s source."""

    def __init__(self, train: Source, val: Source | None = None, test: Source | None = None, *,
                 train_split: str = "train", val_split: str = "test", test_split: str = "test",
                 batch_size: int = 256, eval_batch_size: int | None = None, num_workers: int = 2,
                 seed: int = 0, shuffle_buffer: int = 4096, drop_last: bool = False, on_error: str = "raise",
                 storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
                 cache_limit: int = DEFAULT_LIMIT, with_keys: bool = False, image_size: int | None = None,
                 train_transform: Transform | None = None, eval_transform: Transform | None = None,
                 decode: DecodeSettings | Mapping[str, Any] | None = None) -> None:
        self.sources = dict(zip(STAGES, ((train, train_split), (val or train, val_split), (test or train, test_split)),
                                strict=True))
        settings = LoaderSettings(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                                  seed=seed, shuffle_buffer=shuffle_buffer, drop_last=drop_last, on_error=on_error,
                                  storage_options=storage_options, cache_dir=cache_dir, cache_limit=cache_limit,
                                  with_keys=with_keys)
        super().__init__(settings, image_size=image_size, train_transform=train_transform,
                         eval_transform=eval_transform, decode=decode)

    def build_train(self) -> ShardLoader:
        return self._loader("train", train=True)

    def build_eval(self, stage: str) -> ShardLoader:
        return self._loader(stage, train=False)

    def _loader(self, stage: str, train: bool) -> ShardLoader:
        source, split = self.sources[stage]
        options = self.settings.storage_options
        images = self.image_options(read_schema(source, split=split, storage_options=options), train) \
            if self.decode is not None else self.image_options(None, train)
        return make_loader(source, split=split, **self.loader_options(train), **images)

    def describe(self, stage: str) -> str:
        source, split = self.sources[stage]
        return f"{stage} split {split!r} of {source}"
