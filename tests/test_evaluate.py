"""``evaluate ckpt_path=...``: the run rebuilt from its checkpoint alone, command-line
overrides, checkpoints that are refused, and the confusion-matrix plots."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import CheckpointError, ConfigError, Head, PipelineError, SchemaError, ShardFormatError
from tests.fakes import class_shards, vimh_shards
from tests.test_training import config
from training.checkpoints import load_checkpoint
from training.confusion import class_labels, confusion_figure, thinned_ticks
from training.evaluate import evaluate
from training.train import train

FAST = ("trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "data.batch_size=8")


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"vimh": vimh_shards(root), "cifar100mh": class_shards(root, "cifar100mh")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, roots) -> Path:
    """A SimpleCNN checkpoint of the vimh shards (default settings)."""
    tmp = tmp_path_factory.mktemp("run")
    train(config(tmp, f"data.train={roots['vimh']}", "test=false", *FAST))
    return tmp / "out" / "checkpoints" / "last.ckpt"


def resaved(path: Path, to: Path, change: Any) -> Path:
    """``path`` loaded, changed by ``change(checkpoint)``, saved at ``to``."""
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, to)
    return to


def test_a_convnext_checkpoint_evaluates_from_the_checkpoint_alone(tmp_path: Path, roots) -> None:
    """Trained with a non-default backbone, batch size and settings; evaluated with nothing
    but the checkpoint (and where to write), through Lightning: the same test metrics."""
    trained = train(config(tmp_path, "experiment=vimh_convnext", f"data.train={roots['vimh']}", *FAST,
                           "model.backbone.depths=[1,1,1,1]", "model.backbone.dims=[8,16,24,32]"))
    summary = evaluate(config(tmp_path, f"ckpt_path={tmp_path / 'out/checkpoints/last.ckpt'}",
                              f"paths.output_dir={tmp_path / 'eval'}", name="eval"))
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(summary))
    for head in ("note_number", "note_velocity"):
        entry = written["heads"][head]
        assert entry["samples"] == 32 and entry["mae"] >= 0.0
        assert entry["accuracy"] == pytest.approx(trained[f"test/{head}_acc"])
        assert written["metrics"][f"test/{head}_mae"] == pytest.approx(trained[f"test/{head}_mae"], rel=1e-4)
        assert (tmp_path / "eval" / entry["confusion_png"]).stat().st_size > 1000


def test_a_vit_checkpoint_keeps_its_image_size(tmp_path: Path, roots) -> None:
    """Trained on 24x24 crops of 32x32 images (ViT's patch grid depends on it): the decode
    settings come from the checkpoint; other sizes on the command line are refused."""
    train(config(tmp_path, "experiment=cifar100mh_vit", f"data.train={roots['cifar100mh']}", "data.image_size=24",
                 "model.backbone.dim=16", "model.backbone.depth=1", "model.backbone.heads=2", "test=false", *FAST))
    ckpt = f"ckpt_path={tmp_path / 'out/checkpoints/last.ckpt'}"
    summary = evaluate(config(tmp_path, ckpt, name="eval"))
    assert {h: e["samples"] for h, e in summary["heads"].items()} == {"fine": 48, "coarse": 48}
    with pytest.raises(SchemaError, match=r"trained on 24x24x3 images, the data as configured gives 32x32x3"):
        evaluate(config(tmp_path, ckpt, "data.image_size=32", name="eval"))


def test_data_settings_on_the_command_line_replace_the_runs(tmp_path: Path, roots) -> None:
    shutil.copytree(roots["vimh"], tmp_path / "shards")
    train(config(tmp_path, f"data.train={tmp_path / 'shards'}", "test=false", *FAST))
    (tmp_path / "shards").rename(tmp_path / "moved")
    ckpt = f"ckpt_path={tmp_path / 'out/checkpoints/last.ckpt'}"
    with pytest.raises(ShardFormatError, match=r"shards: no such file or directory"):
        evaluate(config(tmp_path, ckpt, name="eval"))
    summary = evaluate(config(tmp_path, ckpt, f"data.train={tmp_path / 'moved'}", "split=train", "data.batch_size=5",
                              name="eval"))
    assert summary["split"] == "train" and summary["heads"]["note_number"]["samples"] == 64


def test_settings_the_runs_datamodule_lacks_and_unknown_splits_are_refused(tmp_path: Path, checkpoint) -> None:
    with pytest.raises(ConfigError, match=r"data: \['nope'\]: the run's datamodule "
                                            r"training.datamodule.MultiheadDataModule has no such setting"):
        evaluate(config(tmp_path, f"ckpt_path={checkpoint}", "+data.nope=1", name="eval"))
    with pytest.raises(ConfigError, match=r"data: \['sources'\]: .* has no such setting"):
        evaluate(config(tmp_path, f"ckpt_path={checkpoint}", "data.sources=[]", name="eval"))
    with pytest.raises(ConfigError, match=r"split: expected one of \['test', 'val', 'train'\], found 'dev'"):
        evaluate(config(tmp_path, f"ckpt_path={checkpoint}", "split=dev", name="eval"))


def test_data_with_other_heads_is_refused_before_any_work(tmp_path: Path, roots, checkpoint) -> None:
    cfg = config(tmp_path, f"ckpt_path={checkpoint}", f"data.train={roots['cifar100mh']}", name="eval")
    with pytest.raises(SchemaError, match=r"dataset '.*': heads \['fine', 'coarse'\] differ from the "
                                          r"checkpoint's \['note_number', 'note_velocity'\]"):
        evaluate(cfg)
    assert not (tmp_path / "out").exists()


class _RunsCode:
    """Unpickling this would touch ``marker``: code a checkpoint must not get to run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path, roots) -> None:
    marker, evil = tmp_path / "marker", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"schema": _RunsCode(marker)}}, evil)
    refused = rf"{re.escape(str(evil))}: refused: expected a checkpoint of tensors and plain data"
    with pytest.raises(CheckpointError, match=refused):
        evaluate(config(tmp_path, f"ckpt_path={evil}", name="eval"))
    with pytest.raises(CheckpointError, match=refused):
        train(config(tmp_path, f"data.train={roots['vimh']}", f"ckpt_path={evil}", *FAST))
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # what loading it unsafely does
    assert marker.exists()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "missing", "directory", "other"])
def test_a_broken_checkpoint_is_a_project_error_naming_the_file(tmp_path: Path, checkpoint, kind: str) -> None:
    path = tmp_path / "broken.ckpt"
    if kind == "truncated":
        data = checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint\n" * 100)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "other":
        torch.save({"weights": torch.zeros(3)}, path)
    expected = {"missing": "expected a checkpoint file, found no such file",
                "other": r"expected a checkpoint of a MultiheadModule .*, found \['weights'\]"}
    match = rf"{re.escape(str(path))}: " + expected.get(kind, "(expected a PyTorch Lightning checkpoint|refused)")
    with pytest.raises(CheckpointError, match=match):
        evaluate(config(tmp_path, f"ckpt_path={path}", name="eval"))


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_a_truncated_or_garbage_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    """``load_checkpoint`` itself (what ``train ckpt_path=`` and ``evaluate`` call) raises the
    error tree's CheckpointError, a PipelineError, naming the file."""
    path = tmp_path / f"{kind}.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4096.0)}, "hyper_parameters": {"schema": {}}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if kind == "truncated" else bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: (expected a PyTorch Lightning "
                                              r"checkpoint|refused)") as caught:
        load_checkpoint(str(path))
    assert isinstance(caught.value, PipelineError)


@pytest.mark.parametrize(("key", "target"), [("model", "os.system"), ("model.backbone", "builtins.exec"),
                                             ("model.backbone", "training.train.main"), ("data", "subprocess.run")])
def test_a_checkpoint_naming_other_code_is_refused(tmp_path: Path, checkpoint, key: str, target: str) -> None:
    def change(ckpt: dict[str, Any]) -> None:
        node = ckpt["hyper_parameters"]["config"]
        for part in key.split("."):
            node = node[part]
        node["_target_"] = target

    path = resaved(checkpoint, tmp_path / "other.ckpt", change)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: {key}._target_: expected a module, backbone, "
                                            rf".* found '{re.escape(target)}'"):
        evaluate(config(tmp_path, f"ckpt_path={path}", name="eval"))


def test_refused_saved_configs_can_be_given_on_the_command_line(tmp_path: Path, checkpoint) -> None:
    """The command line is trusted: what it gives replaces what the checkpoint names."""
    def change(ckpt: dict[str, Any]) -> None:
        ckpt["hyper_parameters"]["config"]["data"]["_target_"] = "subprocess.run"
        ckpt["hyper_parameters"]["config"]["model"]["_target_"] = "os.system"

    path = f"ckpt_path={resaved(checkpoint, tmp_path / 'other.ckpt', change)}"
    summary = evaluate(config(tmp_path, path, "+data._target_=training.datamodule.MultiheadDataModule",
                              "model=simple_cnn", name="eval"))
    assert summary["heads"]["note_number"]["samples"] == 32


def test_a_checkpoint_without_its_run_config_takes_model_and_data_from_the_command_line(
        tmp_path: Path, roots, checkpoint) -> None:
    """Checkpoints saved before runs kept their config."""
    def forget(ckpt: dict[str, Any]) -> None:
        del ckpt["hyper_parameters"]["config"], ckpt["hyper_parameters"]["image"]

    path = f"ckpt_path={resaved(checkpoint, tmp_path / 'old.ckpt', forget)}"
    with pytest.raises(CheckpointError, match=r"old.ckpt: the checkpoint holds no model config .* expected model="):
        evaluate(config(tmp_path, path, name="eval"))
    with pytest.raises(CheckpointError, match=r"old.ckpt: the checkpoint does not say where its data is"):
        evaluate(config(tmp_path, path, "model=simple_cnn", name="eval"))
    summary = evaluate(config(tmp_path, path, "model=simple_cnn", f"data.train={roots['vimh']}", name="eval"))
    assert summary["heads"]["note_velocity"]["samples"] == 32


def test_weights_that_do_not_fit_the_saved_model_config_are_a_project_error(tmp_path: Path, checkpoint) -> None:
    def narrower(ckpt: dict[str, Any]) -> None:
        ckpt["hyper_parameters"]["config"]["model"]["backbone"]["widths"] = [8, 8, 8]

    path = resaved(checkpoint, tmp_path / "narrow.ckpt", narrower)
    with pytest.raises(CheckpointError, match=r"narrow.ckpt: the weights do not fit the model built from the run's "
                                            r"model config: .*size mismatch"):
        evaluate(config(tmp_path, f"ckpt_path={path}", name="eval"))


def test_axes_show_class_names_or_values_thinned_for_many_classes() -> None:
    number = Head.quantized("note_number", 40, 88, 4)
    assert class_labels(number) == [str(v) for v in range(40, 89, 4)]
    byte = Head.quantized("level", 0.0, 1.0)
    assert byte.num_classes == 256 and class_labels(byte)[:2] == ["0", "0.00392"] and class_labels(byte)[-1] == "1"
    named = Head(name="animal", kind="class", num_classes=3, class_names=("cat", "dog", "eel"))
    assert class_labels(named) == ["cat", "dog", "eel"]
    assert class_labels(Head(name="fine", kind="class", num_classes=4)) == ["0", "1", "2", "3"]
    assert thinned_ticks(13) == list(range(13)) and thinned_ticks(100) == list(range(0, 100, 5))

    figure = confusion_figure(torch.eye(13, dtype=torch.long), number, "note_number")
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == class_labels(number)
    fine = Head(name="fine", kind="class", num_classes=100, class_names=tuple(f"c{i}" for i in range(100)))
    figure = confusion_figure(torch.eye(100, dtype=torch.long), fine, "fine")
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == [f"c{i}" for i in range(0, 100, 5)]
