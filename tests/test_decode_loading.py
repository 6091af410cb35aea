"""The decode stage inside the loader, the mix and the datamodules: batches of ``[B, 3, T, T]``
decoded at the size training needs, the same crops for the same (seed, epoch, sample) with
any workers and after a resume, corrupt images under ``on_error``, grayscale stored data
made RGB, the model's input size taken from the stage."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.photos import encode, photo_array, photo_jpeg
from pipeline import ConfigError, DecodeSpec, MixSource, ShardFormatError, make_loader, mix
from pipeline.format.labels import encode_labels
from pipeline.format.schema import DatasetSchema, Head, ImageSpec
from shard_tools.writer import ShardWriter
from tests.fakes import class_shards, vimh_shards
from training.datamodule import MultiheadDataModule
from training.mix_datamodule import MixDataModule

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
N = 40


def write_photos(root: Path, *, corrupt: tuple[int, ...] = (), gray: bool = False, n: int = N) -> Path:
    """``n`` photo-like JPEGs of varied sizes (sample ``i``'s class is ``i % 10``), 16 a shard;
    the samples in ``corrupt`` cut to a third of their bytes."""
    schema = DatasetSchema(name="photos", split="train", image=ImageSpec(None, None, 1 if gray else 3, encoding="jpg",
                                                                        layout="HWC"),
                           heads=(Head(name="label", kind="class", num_classes=10),))
    rng = np.random.default_rng(3)
    with ShardWriter(root / "train", schema, max_samples=16) as writer:
        for i in range(n):
            height, width = (int(v) for v in rng.integers(40, 120, 2))
            if gray:
                data = encode(photo_array(np.random.default_rng(i), height, width)[:, :, 1], quality=90)
            else:
                data = photo_jpeg(0, i, height, width)
            if i in corrupt:
                data = data[: len(data) // 3]
            writer.write(f"{i:08d}", [("jpg", data), ("labels.msgpack", encode_labels({"label": {"class": i % 10}}))])
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"))


def epoch(loader) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    images, keys, labels = [], [], []
    for batch, label, batch_keys in loader:
        images.append(batch)
        keys += batch_keys
        labels.append(label["label"])
    return torch.cat(images), keys, torch.cat(labels)


@pytest.mark.parametrize("crop", ["random", "center", "resize"])
def test_batches_are_decoded_at_the_spec_size_with_their_labels(photos: Path, crop: str) -> None:
    loader = make_loader(str(photos), batch_size=8, num_workers=0, with_keys=True,
                         decode=DecodeSpec(24, crop=crop, flip=True))  # type: ignore[arg-type]
    images, keys, labels = epoch(loader)
    assert images.shape == (N, 3, 24, 24) and images.dtype == torch.uint8
    assert sorted(keys) == [f"{i:08d}" for i in range(N)]
    assert labels.tolist() == [int(k) % 10 for k in keys]
    assert loader.image_shape == (3, 24, 24)
    assert images.float().std() > 10  # real pictures, not blank slots


def test_the_same_seed_and_epoch_give_the_same_crops_with_any_workers(photos: Path) -> None:
    spec = DecodeSpec(24, flip=True)
    runs = {}
    for workers in (0, 2):
        loader = make_loader(str(photos), batch_size=8, num_workers=workers, seed=5, with_keys=True, decode=spec)
        runs[workers] = [epoch(loader) for _ in range(2)]
    for e in range(2):
        assert torch.equal(runs[0][e][0], runs[2][e][0]) and runs[0][e][1] == runs[2][e][1]
    first, second = runs[0][0], runs[0][1]
    by_key = [dict(zip(run[1], run[0], strict=True)) for run in (first, second)]
    changed = sum(not torch.equal(by_key[0][k], by_key[1][k]) for k in by_key[0])
    assert changed > N // 2  # a new epoch draws new crops
    other_seed = epoch(make_loader(str(photos), batch_size=8, num_workers=0, seed=6, with_keys=True, decode=spec))
    assert not torch.equal(dict(zip(other_seed[1], other_seed[0], strict=True))["00000000"], by_key[0]["00000000"])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_gives_the_same_crops(photos: Path, workers: int) -> None:
    def loader():
        return make_loader(str(photos), batch_size=8, num_workers=workers, seed=7, with_keys=True,
                           decode=DecodeSpec(24, flip=True))

    whole = loader()
    epoch(whole)
    uninterrupted = epoch(whole)  # epoch 1
    first = loader()
    epoch(first)
    head_images, head_keys = [], []
    for n, (images, _, keys) in enumerate(first, start=1):
        head_images.append(images)
        head_keys += keys
        if n == 2:
            break
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    tail = epoch(resumed)
    assert head_keys + tail[1] == uninterrupted[1]
    assert torch.equal(torch.cat([*head_images, tail[0]]), uninterrupted[0])


def test_a_corrupt_jpeg_fails_the_batch_naming_shard_and_key(tmp_path: Path) -> None:
    root = write_photos(tmp_path, corrupt=(19,))
    loader = make_loader(str(root), batch_size=8, num_workers=0, shuffle=False, decode=DecodeSpec(24))
    with pytest.raises(ShardFormatError, match=r"train-000001\.tar: 00000019\.jpg: image does not decode"):
        epoch_plain(loader)


def epoch_plain(loader) -> list[torch.Tensor]:
    return [images for images, _ in loader]


def test_a_corrupt_jpeg_is_skipped_and_logged_under_on_error_skip(tmp_path: Path, caplog) -> None:
    root = write_photos(tmp_path, corrupt=(3, 19))
    loader = make_loader(str(root), batch_size=8, num_workers=0, with_keys=True, on_error="skip",
                         decode=DecodeSpec(24))
    with caplog.at_level(logging.WARNING):
        images, keys, labels = epoch(loader)
    assert images.shape == (N, 3, 24, 24)  # every batch keeps its size: a good sample fills in
    assert not {"00000003", "00000019"} & set(keys)
    assert labels.tolist() == [int(k) % 10 for k in keys]
    assert "skipped 2 bad sample(s)" in caplog.text and "00000003.jpg" in caplog.text


def test_grayscale_jpegs_come_out_rgb(tmp_path: Path) -> None:
    root = write_photos(tmp_path, gray=True, n=16)
    images, _ = next(iter(make_loader(str(root), batch_size=16, num_workers=0, decode=DecodeSpec(20))))
    assert images.shape == (16, 3, 20, 20)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])


def test_decode_specs_are_checked_before_any_worker_starts(photos: Path, tmp_path: Path) -> None:
    raw = vimh_shards(tmp_path)
    with pytest.raises(ConfigError, match=r"decode= makes JPEG/PNG images at a size; the images of .* are raw"):
        make_loader(str(raw), batch_size=4, decode=DecodeSpec(16))
    with pytest.raises(ConfigError, match=r"unknown DecodeSpec field\(s\) \['sise'\]"):
        make_loader(str(photos), batch_size=4, decode={"sise": 16})
    with pytest.raises(ConfigError, match=r"expected a pipeline\.DecodeSpec or a mapping of its fields, found int"):
        make_loader(str(photos), batch_size=4, decode=16)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"pass decode=pipeline.DecodeSpec\(224\)"):
        make_loader(str(photos), batch_size=4)  # sizes vary: a decode spec or a transform is needed
    loader = make_loader(str(photos), batch_size=4, num_workers=0, decode={"size": 16, "crop": "center"})
    assert next(iter(loader))[0].shape == (4, 3, 16, 16)


def test_a_mix_decodes_its_jpeg_source_and_resizes_the_raw_one(photos: Path, tmp_path: Path) -> None:
    from torchvision.transforms import v2

    cifar = class_shards(tmp_path, "cifar100mh")
    loader = mix([MixSource(str(photos), weight=0.5, name="photos", decode=DecodeSpec(24, flip=True)),
                  {"source": str(cifar), "weight": 0.5, "name": "cifar", "transform": v2.Resize((24, 24))}],
                 batch_size=8, num_workers=0, seed=1)
    batches = list(loader)
    assert {tuple(images.shape[1:]) for images, _ in batches} == {(3, 24, 24)}
    dataset = torch.cat([labels["dataset"] for _, labels in batches])
    assert set(dataset.tolist()) == {0, 1} and loader.image_shape == (3, 24, 24)
    with pytest.raises(ConfigError, match=r"mix source .*: decode: unknown DecodeSpec field\(s\) \['crop_to'\]"):
        MixSource(str(photos), decode={"size": 24, "crop_to": "center"})  # type: ignore[arg-type]


def test_the_datamodule_decodes_train_and_eval_with_their_own_specs(photos: Path) -> None:
    dm = MultiheadDataModule(str(photos), val_split="train", batch_size=8, num_workers=0,
                             decode={"size": 28, "train": {"crop": "random", "flip": True, "scale": [0.2, 1.0]}})
    assert (dm.input_image.height, dm.input_image.width, dm.input_image.channels) == (28, 28, 3)
    train_input = dm._train.stream.config.inputs[0]
    assert train_input.decode == DecodeSpec(28, crop="random", flip=True, scale=(0.2, 1.0))
    val = dm.val_dataloader().loader
    assert val.stream.config.inputs[0].decode == DecodeSpec(28, crop="center")
    assert next(iter(val))[0].shape == (8, 3, 28, 28)
    with pytest.raises(ConfigError, match=r"data\.image_size 32 and data\.decode\.size 28 differ"):
        MultiheadDataModule(str(photos), num_workers=0, image_size=32, decode={"size": 28})
    with pytest.raises(ConfigError, match=r"data.decode.eval: unknown DecodeSpec field\(s\) \['crops'\]"):
        MultiheadDataModule(str(photos), num_workers=0, decode={"size": 28, "eval": {"crops": "center"}})


def test_the_mix_datamodule_decodes_jpeg_sources_and_transforms_raw_ones(photos: Path, tmp_path: Path) -> None:
    cifar = class_shards(tmp_path, "cifar100mh")
    dm = MixDataModule([{"source": str(photos), "weight": 0.5, "name": "photos", "val_split": "train"},
                        {"source": str(cifar), "weight": 0.5, "name": "cifar"}],
                       batch_size=8, num_workers=0, decode={"size": 20})
    inputs = dm._train.stream.config.inputs
    assert [put.decode for put in inputs] == [DecodeSpec(20, crop="random", flip=True), None]
    assert inputs[0].transform is None and inputs[1].transform is not None
    assert (dm.input_image.height, dm.input_image.channels) == (20, 3)
    assert {tuple(images.shape[1:]) for images, _ in dm._train} == {(3, 20, 20)}
    val = dm.val_dataloader().loader
    assert [put.decode for put in val.stream.config.inputs] == [DecodeSpec(20, crop="center"), None]
