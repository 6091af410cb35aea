"""The ``shards`` command end to end: generate → convert → validate → inspect."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from shard_tools.cli import main, parse_bytes


def test_generate_convert_validate_inspect(tmp_path: Path, capsys) -> None:
    src = tmp_path / "vimh-16x16x1_cli"
    assert main(["generate", str(src), "--train", "50", "--test", "10", "--size", "16x16x1",
                 "--heads", "3", "--variant", "binary"]) == 0
    assert main(["convert", "vimh", str(src), str(tmp_path / "out"), "--max-samples", "20"]) == 0
    assert "train: 50 samples in 3 shards" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "out"), "--decode", "-q"]) == 0
    grid = tmp_path / "grid.png"
    assert main(["inspect", str(tmp_path / "out"), "--grid", str(grid), "--count", "10"]) == 0
    out = capsys.readouterr().out
    assert "vimh-16x16x1_cli [train]: 50 samples in 3 shards; image 16x16x1 raw CHW" in out
    assert "head note_number: quantized, 13 classes range 40.0..88.0 step 4.0" in out
    with Image.open(grid) as img:
        assert img.size[0] == 8 * 140 and img.size[1] > 2 * 96
    assert main(["inspect", str(tmp_path / "out" / "test"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary[0]["samples"] == 10 and summary[0]["schema"]["split"] == "test"


def test_errors_exit_2_with_the_message(tmp_path: Path, capsys) -> None:
    assert main(["convert", "vimh", str(tmp_path / "none"), str(tmp_path / "out")]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["convert", "cifar", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "unknown source format 'cifar'" in capsys.readouterr().err


def test_console_script_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "shard_tools.cli", "--help"], capture_output=True,
                          text=True, check=True)
    assert "convert" in done.stdout and "validate" in done.stdout


@pytest.mark.parametrize(("text", "value"), [("64MB", 64 << 20), ("1.5G", 3 << 29), ("1000", 1000),
                                             ("2KiB", 2048)])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_parse_bytes_rejects_junk() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a size such as 256MB, found 'lots'"):
        parse_bytes("lots")
