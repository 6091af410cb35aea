"""The installed ``train`` and ``evaluate`` commands: they find their configs from any working
directory and from every kind of install, and keep library notices out of their output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.fakes import class_shards, vimh_shards

REPO = Path(__file__).resolve().parents[1]
# what the entry points silence (docs/training.md lists them); each shows in a run without the filters
NOTICES = ("💡 Tip", "litlogger", "was configured so", "smaller than the logging interval", "LeafSpec",
           "image decoding and encoding capabilities of TorchVision are deprecated")


def command(name: str) -> str:
    """The console script ``name`` installed next to this interpreter (the venv's ``bin``)."""
    for where in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        found = shutil.which(name, path=str(where))
        if found:
            return found
    raise AssertionError(f"console script {name!r} is not installed next to {sys.executable}: pip install -e .")


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=240, env={**os.environ, **env})


@pytest.mark.parametrize(("name", "task"), [("train", "train"), ("evaluate", "eval")])
def test_installed_command_finds_its_configs_from_any_directory(tmp_path: Path, name: str, task: str) -> None:
    done = run([command(name), "--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "experiment: cifar100mh_cnn, cifar100mh_convnext" in done.stdout and f"task_name: {task}" in done.stdout


def test_python_dash_m_still_works_from_the_repository() -> None:
    done = run([sys.executable, "-m", "training.train", "experiment=vimh_convnext", "--cfg", "job"], cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training.backbones.ConvNeXtV2" in done.stdout


def test_installed_train_runs_from_another_directory(tmp_path: Path) -> None:
    root = vimh_shards(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run([command("train"), "experiment=vimh_cnn", f"data.train={root}", "trainer.fast_dev_run=true",
                "data.num_workers=0", "data.batch_size=8", "trainer.enable_progress_bar=false",
                f"hydra.run.dir={tmp_path / 'run'}"], cwd=elsewhere)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "per-head metrics" in done.stdout and "val/note_number_acc" in done.stdout


def test_a_non_editable_install_ships_the_configs(tmp_path: Path) -> None:
    """``pip install .`` (not ``-e``) into a directory, run from another one: the console
    scripts there import the installed copy, which must carry the whole config tree."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("pipeline", "shard_tools", "training", "configs"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    done = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                "--target", str(site), str(source)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    shipped = {p.relative_to(site / "training" / "configs").as_posix()
               for p in (site / "training" / "configs").rglob("*.yaml")}
    assert shipped == {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([sys.executable, "-c", "import training; print(training.__file__)"], cwd=elsewhere,
                PYTHONPATH=str(site))
    assert where.stdout.strip() == str(site / "training" / "__init__.py")
    for name, args in (("train", ["experiment=vimh_vit"]), ("evaluate", ["ckpt_path=x.ckpt", "model=vit"])):
        done = run([str(site / "bin" / name), *args, "--cfg", "job"], cwd=elsewhere, PYTHONPATH=str(site))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "training.backbones.ViT" in done.stdout


def test_a_short_run_keeps_library_notices_out_of_stderr(tmp_path: Path) -> None:
    """JPEG shards (torchvision decodes them, in a worker process), 2 training batches
    (< log_every_n_steps), limit_val_batches=1; PYTHONWARNINGS=default shows every deprecation
    a user could see. The project's own messages still show (and its errors:
    test_training.py::test_missing_dataset_fails_before_training)."""
    root = class_shards(tmp_path / "data", "imagenet100")
    done = run([command("train"), "experiment=imagenet100_cnn", f"data.train={root}", "trainer.max_epochs=1",
                "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "data.num_workers=1",
                "data.batch_size=8", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}"],
               cwd=tmp_path, PYTHONWARNINGS="default")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert not [n for n in NOTICES if n in done.stderr], done.stderr
    assert "dataset imagenet100-fake: heads label (100)" in done.stdout and "waiting for data" in done.stdout


def test_evaluate_keeps_library_notices_out_of_stderr(tmp_path: Path) -> None:
    from tests.test_training import config
    from training.train import train

    root = class_shards(tmp_path / "data", "imagenet100")
    train(config(tmp_path, "experiment=imagenet100_cnn", f"data.train={root}", "trainer.max_epochs=1", "test=false",
                 "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "data.batch_size=8"))
    done = run([command("evaluate"), f"ckpt_path={tmp_path / 'out/checkpoints/last.ckpt'}", "data.num_workers=1",
                "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'eval'}"],
               cwd=tmp_path, PYTHONWARNINGS="default")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert not [n for n in NOTICES if n in done.stderr], done.stderr
    assert "label                    acc " in done.stdout and (tmp_path / "eval" / "metrics.json").exists()
