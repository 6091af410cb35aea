"""The Makefile's data targets, as a user runs them (inside the already installed .venv)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".venv/.installed").exists(),
                    reason="needs make and the project's .venv (make install)")
def test_make_shards_validate_and_demo(tmp_path: Path) -> None:
    def make(*args: str) -> str:
        done = subprocess.run(["make", "-C", str(ROOT), *args, f"DATA={tmp_path}"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    make("shards", "DATASET=vimh")
    assert "OK: " in make("validate", f"OUT={tmp_path}/shards/vimh")
    report = json.loads((tmp_path / "shards/vimh/validation.json").read_text())
    assert report["ok"] and report["splits"] == {"train": 4096, "test": 1024}
    out = make("demo")
    assert "OK: 5 shards, 5120 samples" in out
    assert (tmp_path / "shards/demo/grid.png").stat().st_size > 0
