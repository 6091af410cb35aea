"""The Makefile's data targets, as a user runs them (inside the already installed .venv)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


needs_make = pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".venv/.installed").exists(),
                                reason="needs make and the project's .venv (make install)")


def run_make(data: Path, *args: str) -> str:
    done = subprocess.run(["make", "-C", str(ROOT), *args, f"DATA={data}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@needs_make
def test_make_shards_validate_and_demo(tmp_path: Path) -> None:
    def make(*args: str) -> str:
        return run_make(tmp_path, *args)

    make("shards", "DATASET=vimh")
    assert "OK: " in make("validate", f"OUT={tmp_path}/shards/vimh")
    report = json.loads((tmp_path / "shards/vimh/validation.json").read_text())
    assert report["ok"] and report["splits"] == {"train": 4096, "test": 1024}
    out = make("demo")
    assert "OK: 5 shards, 5120 samples" in out
    assert (tmp_path / "shards/demo/grid.png").stat().st_size > 0


@needs_make
def test_make_shards_cifar100mh_from_a_generated_source(tmp_path: Path) -> None:
    run_make(tmp_path, "shards", "DATASET=cifar100mh")
    assert (tmp_path / "sources/cifar100mh-32x32x3_demo/cifar100mh_dataset_info.json").exists()
    assert "OK: 2 shards, 5120 samples" in run_make(tmp_path, "validate", f"OUT={tmp_path}/shards/cifar100mh")
