"""What every datamodule of this project shares (:class:`ShardDataModule`): the train loader is
built with the module, so the schema (and the model's heads) come from the loader and
unreachable or missing shards fail before training starts; it is built again when
Lightning starts DDP; evaluation splits must have the training data's heads; the train
loader's place in its epoch is saved in checkpoints as the number of batches trained, so a
resumed run continues with the next batch of the same epoch order.

Images reach the model as ``image_size`` squares: JPEG/PNG sources through the decode
stage when ``decode`` is given (a random resized crop and flip for training, resize and
centre crop for evaluation, decoded at that size: :class:`DecodeSettings`), other images
through ``train_transform``/``eval_transform`` (default: the same geometry with torchvision
v2). The model is sized from what the train loader gives."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L

from pipeline import (
    ConfigError,
    DatasetSchema,
    DecodeSpec,
    ImageSpec,
    SchemaError,
    ShardLoader,
    Transform,
    default_world,
)
from pipeline.format.schema import check_same_heads
from pipeline.io.disk_cache import DEFAULT_LIMIT

log = logging.getLogger(__name__)
STAGES = ("train", "val", "test")


def default_transforms(size: int, *, train: bool) -> Transform:
    """torchvision v2 transforms to ``size`` x ``size``: a random resized crop and flip for
    training, resize and centre crop for evaluation. Images stay uint8."""
    from torchvision.transforms import v2

    if train:
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])


@dataclass(frozen=True)
class DecodeSettings:
    """The decode stage's specs for training and evaluation, one ``size``: ``train`` and
    ``eval`` hold the other :class:`pipeline.DecodeSpec` fields (from YAML:
    ``data.decode.size=112``, ``data.decode.train.scale=[0.2,1.0]``)."""

    size: int
    train: Mapping[str, Any] = field(default_factory=lambda: {"crop": "random", "flip": True})
    eval: Mapping[str, Any] = field(default_factory=lambda: {"crop": "center"})

    @classmethod
    def of(cls, value: DecodeSettings | Mapping[str, Any] | None) -> DecodeSettings | None:
        if value is None or isinstance(value, DecodeSettings):
            return value
        unknown = sorted(set(value) - {"size", "train", "eval"})
        if unknown or "size" not in value:
            raise ConfigError(f"data.decode: expected size and optionally train and eval (DecodeSpec fields), "
                              f"found {sorted(value)}")
        settings = cls(**value)
        for train in (True, False):  # bad fields fail now
            settings.spec(train)
        return settings

    def spec(self, train: bool) -> DecodeSpec:
        fields = dict(self.train if train else self.eval)
        if "size" in fields:
            raise ConfigError(f"data.decode.{'train' if train else 'eval'}: the size is data.decode.size, "
                              f"found a size here too ({fields['size']})")
        return DecodeSpec.from_fields({"size": self.size, **fields}, f"data.decode.{'train' if train else 'eval'}")


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


@dataclass(frozen=True)
class LoaderSettings:
    """The loader settings every datamodule takes (``eval_batch_size``: default ``batch_size``)."""

    batch_size: int = 256
    eval_batch_size: int | None = None
    num_workers: int = 2
    seed: int = 0
    shuffle_buffer: int = 4096
    drop_last: bool = False
    on_error: str = "raise"
    storage_options: dict[str, Any] | None = None
    cache_dir: str | None = None
    cache_limit: int = DEFAULT_LIMIT
    with_keys: bool = False

    def batch(self, train: bool) -> int:
        return self.batch_size if train or self.eval_batch_size is None else self.eval_batch_size


class ShardDataModule(L.LightningDataModule):
    """The base of the datamodules: a subclass says how to build its train loader and a
    stage's evaluation loader; everything else is here (see the module)."""

    def __init__(self, settings: LoaderSettings, *, image_size: int | None = None,
                 train_transform: Transform | None = None, eval_transform: Transform | None = None,
                 decode: DecodeSettings | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.decode = DecodeSettings.of(decode)
        if self.decode is not None:
            if image_size not in (None, self.decode.size):
                raise ConfigError(f"data.image_size {image_size} and data.decode.size {self.decode.size} differ; "
                                  "give one of them (the decode size is the image size)")
            image_size = self.decode.size
        if image_size is not None:
            train_transform = train_transform or default_transforms(image_size, train=True)
            eval_transform = eval_transform or default_transforms(image_size, train=False)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self._resume: dict[str, int] | None = None
        self._train: ShardLoader = self.build_train()  # reads every header now
        self.schema: DatasetSchema = self._train.schema
        self.input_image = self._input_image(image_size)

    def build_train(self) -> ShardLoader:
        """The train loader, planned for the process group as it is now."""
        raise NotImplementedError

    def build_eval(self, stage: str) -> ShardLoader:
        """The evaluation loader of ``stage``: every sample once, in order."""
        raise NotImplementedError

    def loader_options(self, train: bool) -> dict[str, Any]:
        """The keyword arguments ``make_loader`` and ``mix`` share, for training or evaluation."""
        s = self.settings
        return {"batch_size": s.batch(train), "num_workers": s.num_workers, "seed": s.seed, "shuffle": train,
                "shuffle_buffer": s.shuffle_buffer, "drop_last": s.drop_last and train, "on_error": s.on_error,
                "storage_options": s.storage_options, "cache_dir": s.cache_dir, "cache_limit": s.cache_limit,
                "with_keys": s.with_keys, "uneven": "drop" if train else "pad"}

    def image_options(self, schema: DatasetSchema | None, train: bool) -> dict[str, Any]:
        """How a source's images (``schema``: needed when ``decode`` is set) become what the
        model sees: JPEG/PNG images through the decode stage when ``decode`` is set, else the
        transform of training or evaluation."""
        if self.decode is not None and schema is not None and schema.image.encoding != "raw":
            return {"decode": self.decode.spec(train), "transform": None}
        return {"decode": None, "transform": self.train_transform if train else self.eval_transform}

    def _input_image(self, image_size: int | None) -> ImageSpec:
        """What the model sees: the shape the train loader's decode specs and transforms were
        found to give, else ``image_size`` squares, else the stored images."""
        spec, shape = self.schema.image, self._train.image_shape
        if shape is not None and len(shape) == 3:
            return ImageSpec(height=shape[1], width=shape[2], channels=shape[0])
        if image_size is not None:
            return ImageSpec(image_size, image_size, spec.channels)
        if not spec.fixed_size:
            raise SchemaError(f"the images of {self.schema.name!r} vary in size; set image_size (and, if "
                              "you like, train_transform/eval_transform) so that the model sees one size")
        return spec

    def train_dataloader(self) -> LightningLoader:
        """The train loader: the one built with the module, unless Lightning has started DDP
        since (then built again for this rank), moved to a checkpoint's place if resuming."""
        config = self._train.stream.config
        if (config.world_size, config.rank) != default_world():
            self._train = self.build_train()
        if self._resume is not None:
            state = {**self._train.state_dict(), **self._resume}
            self._train.load_state_dict(state)
            log.info("train loader resumes at epoch %d after %d batches", state["epoch"], state["batches_done"])
            self._resume = None
        return LightningLoader(self._train)

    def eval_dataloader(self, stage: str) -> LightningLoader:
        """The data of ``stage`` (``train``, ``val`` or ``test``) for evaluation: every sample
        once, in order, with the eval transform; its heads must be the training data's."""
        if stage not in STAGES:
            raise ConfigError(f"stage: expected one of {list(STAGES)}, found {stage!r}")
        loader = self.build_eval(stage)
        check_same_heads(self.schema, loader.schema, self.describe(stage), "the training data")
        return LightningLoader(loader)

    def describe(self, stage: str) -> str:
        """How messages name the data of ``stage``."""
        return f"{stage} data"

    def val_dataloader(self) -> LightningLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> LightningLoader:
        return self.eval_dataloader("test")

    def state_dict(self) -> dict[str, Any]:
        """Where the train loader is: the epoch and how many of its batches were trained."""
        trainer = self.trainer
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed}  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume = {"epoch": int(state_dict["epoch"]), "batches_done": int(state_dict["batches_done"])}
