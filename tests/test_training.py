"""The Lightning/Hydra trainer on tiny generated shards."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pipeline.errors import SchemaError, ShardFormatError
from pipeline.format.schema import DatasetSchema
from tests.fakes import class_shards, vimh_shards
from training.datamodule import MultiheadDataModule
from training.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml") if not p.stem.startswith("mix_"))
MIX_EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("mix_*.yaml"))


def config(tmp_path: Path, *overrides: str, name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(name, overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}",
                                        "data.num_workers=0", "trainer.enable_progress_bar=false", *overrides])


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"vimh": vimh_shards(root), "cifar100mh": class_shards(root, "cifar100mh"),
            "imagenet100": class_shards(root, "imagenet100")}


@pytest.mark.parametrize("experiment", [pytest.param(e, marks=pytest.mark.slow) if "efficientnet" in e else e
                                        for e in EXPERIMENTS])
def test_every_experiment_runs_fast_dev_run(tmp_path: Path, data_roots, experiment: str) -> None:
    dataset = experiment.split("_")[0]
    cfg = config(tmp_path, f"experiment={experiment}", f"data.train={data_roots[dataset]}",
                 "trainer.fast_dev_run=true", "data.batch_size=8")
    metrics = train(cfg)
    assert "train/loss" in metrics or "train/loss_step" in metrics
    assert any(k.startswith("val/") and k.endswith("_acc") for k in metrics)


def test_the_imagenet_experiment_decodes_at_the_configured_size(tmp_path: Path, data_roots) -> None:
    """``data.decode.size`` and the train/eval specs from the command line reach the loaders,
    and the model is built for the decoded size."""
    from hydra.utils import instantiate

    from pipeline import DecodeSpec

    cfg = config(tmp_path, "experiment=imagenet100_cnn", f"data.train={data_roots['imagenet100']}",
                 "data.decode.size=40", "data.decode.train.scale=[0.2,1.0]", "data.batch_size=8")
    datamodule = instantiate(cfg.data)
    assert datamodule._train.stream.config.inputs[0].decode == DecodeSpec(40, crop="random", flip=True,
                                                                          scale=(0.2, 1.0))
    assert datamodule.val_dataloader().loader.stream.config.inputs[0].decode == DecodeSpec(40, crop="center")
    assert (datamodule.input_image.height, datamodule.input_image.width) == (40, 40)
    images, _ = next(iter(datamodule._train))
    assert images.shape == (8, 3, 40, 40)


def test_demo_settings_learn_every_head(tmp_path: Path) -> None:
    """Well above chance (1/13 and 1/9) after 3 epochs over 1024 samples."""
    root = vimh_shards(tmp_path, n_train=1024, n_test=256, size=16, channels=1)
    cfg = config(tmp_path, "experiment=vimh_demo", f"data.train={root}", "trainer.max_epochs=3",
                 "data.batch_size=64", "logger=csv")
    metrics = train(cfg)
    assert metrics["test/note_number_acc"] > 0.5 and metrics["test/note_velocity_acc"] > 0.5, metrics
    assert 0.0 <= metrics["train/data_stall_share"] < 1.0


def test_missing_head_labels_are_masked(data_roots) -> None:
    import hydra

    cfg = config(Path("/tmp"), f"data.train={data_roots['cifar100mh']}")
    schema = MultiheadDataModule(str(data_roots["cifar100mh"]), num_workers=0).schema
    model = hydra.utils.instantiate(cfg.model, _partial_=True)(schema=schema)
    images = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    labels = {"fine": torch.tensor([1, 2, 3, 4, 5, 6]), "coarse": torch.tensor([-1, -1, -1, 3, 4, -1])}
    outputs = model(images)
    base = model.losses(outputs, labels)
    perturbed = dict(outputs)
    perturbed["coarse"] = outputs["coarse"].clone()
    perturbed["coarse"][[0, 1, 2, 5]] += 100 * torch.randn(4, 20)
    again = model.losses(perturbed, labels)
    assert torch.equal(base["coarse"], again["coarse"]) and torch.equal(base["fine"], again["fine"])
    none_labelled = {"fine": labels["fine"], "coarse": torch.full((6,), -1)}
    loss = model.losses(outputs, none_labelled)["coarse"]
    assert loss.item() == 0.0 and loss.requires_grad


def test_the_overrides_train_yaml_suggests_compose(tmp_path: Path) -> None:
    """Every ``key=value`` override the comment of configs/train.yaml gives works as written;
    a key the config lacks (a loss weight) needs ``+``."""
    comment = "".join(line for line in (CONFIGS / "train.yaml").read_text().splitlines(True) if line.startswith("#"))
    overrides = re.findall(r"`([+\w.]+=[^`]+)`", comment)
    assert any("loss_weights" in o for o in overrides), overrides
    for override in overrides:
        config(tmp_path, override)  # a bad override raises ConfigCompositionException
    assert config(tmp_path, "+model.loss_weights.note_velocity=2.0").model.loss_weights == {"note_velocity": 2.0}


def test_unknown_loss_weight_is_refused(tmp_path: Path, data_roots) -> None:
    cfg = config(tmp_path, f"data.train={data_roots['vimh']}", "+model.loss_weights.nope=2.0",
                 "trainer.fast_dev_run=true")
    with pytest.raises(SchemaError, match=r"loss_weights names heads \['nope'\] that dataset .* does not have"):
        train(cfg)


def test_missing_dataset_fails_before_training(tmp_path: Path) -> None:
    cfg = config(tmp_path, "experiment=cifar100mh_cnn", f"data.train={tmp_path / 'nowhere'}")
    with pytest.raises(ShardFormatError, match=r"nowhere: no such file or directory"):
        train(cfg)
    done = subprocess.run([sys.executable, "-m", "training.train", "experiment=cifar100mh_cnn",
                           f"data.train={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "nowhere: no such file or directory" in done.stdout + done.stderr


def test_checkpoint_from_other_heads_fails_before_training(tmp_path: Path, data_roots) -> None:
    cfg = config(tmp_path, f"data.train={data_roots['vimh']}", "trainer.max_epochs=1", "test=false",
                 "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")
    train(cfg)
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    other = config(tmp_path, "experiment=cifar100mh_cnn", f"data.train={data_roots['cifar100mh']}",
                   f"ckpt_path={ckpt}")
    with pytest.raises(SchemaError, match=r"dataset '.*': heads \['fine', 'coarse'\] differ from the "
                                          r"checkpoint's \['note_number', 'note_velocity'\]"):
        train(other)


def test_resuming_and_testing_read_checkpoints_weights_only(tmp_path: Path, data_roots, monkeypatch) -> None:
    """Every checkpoint a run reads (its own check of a resumed checkpoint, Lightning's
    restore in fit and test) is read with torch.load(weights_only=True): no code runs."""
    fast = ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1", f"data.train={data_roots['vimh']}"]
    train(config(tmp_path, "trainer.max_epochs=1", "test=false", *fast))
    real_load, calls = torch.load, []

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    train(config(tmp_path, "trainer.max_epochs=2", "test=true", f"ckpt_path={tmp_path / 'out/checkpoints/last.ckpt'}",
                 *fast))
    assert len(calls) >= 3 and all(w is True for w in calls), calls


def test_rich_progress_bar_is_a_callbacks_choice(tmp_path: Path, data_roots) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    from training.train import instantiate_all

    cfg = config(tmp_path, f"data.train={data_roots['vimh']}", "callbacks=[default,rich_progress_bar]",
                 "trainer.enable_progress_bar=true", "trainer.fast_dev_run=true", "data.batch_size=8")
    kinds = {type(c) for c in instantiate_all(cfg.callbacks)}
    assert {RichProgressBar, ModelCheckpoint} <= kinds
    assert "val/note_number_acc" in train(cfg)


def test_evaluate_writes_metrics_and_confusion_matrices(tmp_path: Path, data_roots) -> None:
    from training.evaluate import evaluate

    train(config(tmp_path, f"data.train={data_roots['vimh']}", "trainer.max_epochs=1", "test=false"))
    checkpoint = tmp_path / "out/checkpoints/last.ckpt"
    cfg = config(tmp_path, f"data.train={data_roots['vimh']}", f"ckpt_path={checkpoint}", name="eval")
    summary = evaluate(cfg)
    assert set(summary["heads"]) == {"note_number", "note_velocity"}
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["heads"]["note_number"]["samples"] == 32
    assert (tmp_path / "out" / "confusion_note_number.png").stat().st_size > 1000


def test_training_from_s3(tmp_path: Path, data_roots, s3_options: dict) -> None:
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=s3_options["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="train-data")
    s3fs.S3FileSystem(**s3_options).put(str(data_roots["vimh"]) + "/", "train-data/vimh/", recursive=True)
    endpoint = s3_options["client_kwargs"]["endpoint_url"]
    options = f"{{key: testing, secret: testing, client_kwargs: {{endpoint_url: '{endpoint}'}}}}"
    cfg = config(tmp_path, "data.train=s3://train-data/vimh", "trainer.max_epochs=1", f"data.storage_options={options}")
    metrics = train(cfg)
    assert "test/note_number_acc" in metrics


class _Recorder(L.Callback):
    def __init__(self, crash_at: int | None = None) -> None:
        self.keys: list[str] = []
        self.crash_at = crash_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.crash_at is not None and batch_idx == self.crash_at:
            raise RuntimeError("simulated crash")
        if trainer.current_epoch == 0:
            self.keys += batch[2]


def _fit(root: Path, tmp_path: Path, recorder: _Recorder, ckpt: str | None = None) -> None:
    import hydra

    datamodule = MultiheadDataModule(str(root), batch_size=4, num_workers=2, with_keys=True, seed=3)
    cfg = config(tmp_path, f"data.train={root}")
    model = hydra.utils.instantiate(cfg.model, _partial_=True)(schema=datamodule.schema)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=5, save_top_k=-1,
                                                filename="{step}")
    trainer = L.Trainer(max_epochs=1, callbacks=[recorder, saver], logger=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)


def test_resumed_run_sees_each_sample_of_the_epoch_once(tmp_path: Path, data_roots) -> None:
    root = data_roots["vimh"]
    first = _Recorder(crash_at=7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(root, tmp_path, first)
    second = _Recorder()
    _fit(root, tmp_path, second, ckpt=str(tmp_path / "ck" / "step=5.ckpt"))
    seen = first.keys[:5 * 4] + second.keys
    assert len(seen) == 64 and len(set(seen)) == 64


def test_datamodule_refuses_a_split_with_other_heads(tmp_path: Path, data_roots) -> None:
    datamodule = MultiheadDataModule(str(data_roots["vimh"]), test=str(data_roots["cifar100mh"]), num_workers=0)
    assert isinstance(datamodule.schema, DatasetSchema)
    with pytest.raises(SchemaError, match=r"test split 'test' of .*cifar100mh: heads \['fine', 'coarse'\] differ"):
        datamodule.test_dataloader()


def test_ddp_training_with_two_gloo_processes(tmp_path: Path, data_roots) -> None:
    """`trainer=ddp` on CPU: Lightning starts a second process, the loader splits the epoch."""
    done = subprocess.run([sys.executable, "-m", "training.train", "experiment=vimh_demo", "trainer=ddp",
                           "trainer.max_epochs=1", "test=false", f"data.train={data_roots['vimh']}",
                           "data.num_workers=0", "data.batch_size=8", f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.log_dir={tmp_path / 'logs'}"],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "val/note_number_acc" in done.stdout
    metrics = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/data_stall_share" in metrics


def test_csv_and_tensorboard_loggers_write_their_files(tmp_path: Path, data_roots) -> None:
    cfg = config(tmp_path, f"data.train={data_roots['vimh']}", "logger=many", "trainer.max_epochs=1", "test=false",
                 "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1")
    train(cfg)
    assert list((tmp_path / "out" / "tensorboard").rglob("events.out.tfevents.*"))
    metrics = next((tmp_path / "out" / "csv").rglob("metrics.csv")).read_text()
    assert "val/note_number_acc" in metrics and "train/data_stall_share" in metrics


def mix_sources(*pairs: tuple[str, Path, float], **extra: str) -> str:
    """A Hydra override of ``data.sources``: (name, root, weight) per source."""
    items = []
    for name, root, weight in pairs:
        fields = {"source": str(root), "split": "train", "weight": weight, "name": name, **extra.get(name, {})}
        items.append("{" + ",".join(f"{k}:{v}" for k, v in fields.items()) + "}")
    return "data.sources=[" + ",".join(items) + "]"


@pytest.mark.parametrize("experiment", MIX_EXPERIMENTS)
def test_every_mix_experiment_runs_fast_dev_run(tmp_path: Path, data_roots, experiment: str) -> None:
    first, second = experiment.split("_")[1:3]
    roots = {"vimh": data_roots["vimh"], "cifar100mh": data_roots["cifar100mh"], "cifar100": data_roots["cifar100mh"],
             "imagenet100": data_roots["imagenet100"]}
    extra = {"a": {"val_split": "val", "test_split": "val"}} if first == "imagenet100" else {}
    cfg = config(tmp_path, f"experiment={experiment}", mix_sources(("a", roots[first], 0.5),
                                                                     ("b", roots[second], 0.5), **extra),
                 "trainer.fast_dev_run=true", "data.batch_size=8",  # vimh here: 16x16
                 "data.decode.size=32" if first == "imagenet100" else "data.image_size=32")
    metrics = train(cfg)
    heads = {"vimh": ["note_number", "note_velocity"], "cifar100mh": ["fine", "coarse"], "cifar100": ["fine", "coarse"],
             "imagenet100": ["label"]}
    assert {f"val/{h}_acc" for h in ["dataset", *heads[first], *heads[second]]} <= set(metrics), sorted(metrics)


def test_mix_sources_take_their_own_transforms_from_yaml(tmp_path: Path, data_roots) -> None:
    """A source's ``transform`` in the config is instantiated by Hydra; with every source
    resized to one size the model's input comes from it, no ``image_size`` needed."""
    resize = "{_target_:torchvision.transforms.v2.Resize,size:[24,24]}"
    cfg = config(tmp_path, "experiment=mix_vimh_cifar100mh", "trainer.fast_dev_run=true", "data.batch_size=8",
                 mix_sources(("v", data_roots["vimh"], 0.5), ("c", data_roots["cifar100mh"], 0.5),
                             v={"transform": resize}, c={"transform": resize}))
    metrics = train(cfg)
    assert {"val/fine_acc", "val/note_number_acc", "val/dataset_acc"} <= set(metrics)
    with pytest.raises(SchemaError, match=r"each source's transform \(then the mix's\) gives images of 2 shapes"):
        train(config(tmp_path, "experiment=mix_vimh_cifar100mh", "trainer.fast_dev_run=true",
                     mix_sources(("v", data_roots["vimh"], 0.5), ("c", data_roots["cifar100mh"], 0.5),
                                 v={"transform": resize})))


@pytest.mark.slow
def test_training_on_a_mix_learns_every_head(tmp_path: Path) -> None:
    """VIMH (2 quantized heads) and the CIFAR-100 release layout (fine, coarse) mixed 50/50:
    every head, and the dataset head, well above chance after a few epochs."""
    from shard_tools.convert import convert
    from shard_tools.formats.cifar100mh.synthetic import generate_cifar100
    from shard_tools.formats.vimh.synthetic import generate_vimh

    convert("vimh", generate_vimh(tmp_path / "src" / "vimh-32x32x3_m", n_train=1024, n_test=256), tmp_path / "vimh")
    convert("cifar100mh", generate_cifar100(tmp_path / "src" / "cifar100", n_train=2048, n_test=512),
            tmp_path / "cifar")
    cfg = config(tmp_path, "experiment=mix_vimh_cifar100mh",
                 mix_sources(("vimh", tmp_path / "vimh", 0.5), ("cifar", tmp_path / "cifar", 0.5)),
                 "data.epoch_samples=2048", "trainer.max_epochs=6", "data.batch_size=64", "logger=csv",
                 "model.optimizer.lr=0.004")
    metrics = train(cfg)
    chance = {"note_number": 1 / 13, "note_velocity": 1 / 9, "fine": 1 / 100, "coarse": 1 / 20, "dataset": 1 / 2}
    for head, p in chance.items():
        assert metrics[f"test/{head}_acc"] > min(0.9, 3 * p), (head, metrics)


def test_evaluate_a_mix_checkpoint_counts_each_heads_own_samples(tmp_path: Path, data_roots) -> None:
    from training.evaluate import evaluate

    sources = mix_sources(("v", data_roots["vimh"], 0.5), ("c", data_roots["cifar100mh"], 0.5))
    train(config(tmp_path, "experiment=mix_vimh_cifar100mh", sources, "data.image_size=32", "trainer.max_epochs=1",
                 "test=false"))
    # the mix, its sources and the image size come from the checkpoint
    summary = evaluate(config(tmp_path, f"ckpt_path={tmp_path / 'out/checkpoints/last.ckpt'}", name="eval"))
    samples = {head: entry["samples"] for head, entry in summary["heads"].items()}
    assert samples == {"note_number": 32, "note_velocity": 32, "fine": 48, "coarse": 48, "dataset": 80}
    summary = evaluate(config(tmp_path, f"ckpt_path={tmp_path / 'out/checkpoints/last.ckpt'}", "split=train",
                              name="eval"))  # each source's training split, every sample once
    samples = {head: entry["samples"] for head, entry in summary["heads"].items()}
    assert samples == {"note_number": 64, "note_velocity": 64, "fine": 48, "coarse": 48, "dataset": 112}


@pytest.mark.slow
def test_ddp_training_on_a_mix_splits_every_source_across_ranks(tmp_path: Path, data_roots) -> None:
    """The mix datamodule is built before Lightning starts DDP: each rank must still read
    its own half of every source (vimh 64 and cifar100mh 48 train samples, 50/50)."""
    sources = mix_sources(("v", data_roots["vimh"], 0.5), ("c", data_roots["cifar100mh"], 0.5))
    done = subprocess.run([sys.executable, "-m", "training.train", "experiment=mix_vimh_cifar100mh", "trainer=ddp",
                           sources, "data.image_size=32", "trainer.max_epochs=1", "test=false",
                           "data.num_workers=0", "data.batch_size=8", f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.log_dir={tmp_path / 'logs'}"],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for rank in (0, 1):
        assert f"mix epoch 0 rank {rank} realized proportions: v 0.5000 (28/56, target 0.5000), c 0.5000 (28/56" in out
