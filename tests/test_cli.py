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
    with Image.open(grid) as img:  # tiles wide enough for the longest caption line, uncut
        assert img.size[0] == 8 * (6 * len("note_velocity: 106.4 (class 104)") + 8) and img.size[1] > 2 * 96
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


def test_validate_exits_2_when_it_could_not_run(tmp_path: Path, capsys) -> None:
    assert main(["validate", str(tmp_path / "nothing"), str(tmp_path / "nor this"), "-q"]) == 2
    out, err = capsys.readouterr()
    assert f"{tmp_path / 'nothing'}: no such file or directory" in out and "['" not in out
    assert "error: could not read" in err


def test_inspect_names_varying_sizes_and_shows_whole_head_names(tmp_path: Path, capsys) -> None:
    from tests.fakes import class_shards

    root = class_shards(tmp_path, "imagenet100")
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "image (varying)x3 jpg HWC" in out and "None" not in out


def test_inspect_names_a_split_without_manifest_by_its_split_and_warns(tmp_path: Path, capsys) -> None:
    assert main(["generate", str(tmp_path / "src"), "--format", "vimh"]) == 0
    assert main(["convert", "vimh", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    (tmp_path / "out" / "train" / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "[train]: " in out and "[test]: " in out and f"[{tmp_path}" not in out
    assert f"warning: {tmp_path / 'out' / 'train'}: no manifest.json" in out


def test_grid_captions_show_class_names_and_values() -> None:
    from pipeline import DatasetSchema, Head, ImageSpec
    from shard_tools.inspect import _caption

    schema = DatasetSchema(name="d", split="train", image=ImageSpec(4, 4, 1), heads=(
        Head(name="a_rather_long_head_name_of_thirty_two", kind="class", num_classes=2, class_names=("cat", "dog")),
        Head.quantized("pitch", 40.0, 88.0, 4.0)))
    record = {"a_rather_long_head_name_of_thirty_two": {"class": 1}, "pitch": {"class": 3, "q": 60, "value": 51.29}}
    assert _caption(schema, record) == ["a_rather_long_head_name_of_thirty_two: dog", "pitch: 51.29 (class 52)"]


def test_an_s3_failure_without_credentials_says_how_to_give_them(monkeypatch) -> None:
    from pipeline import ShardFormatError
    from pipeline.io.storage import remote_errors

    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    hint = r"s3://b/x.tar: access denied .*\n  \(no S3 endpoint or credentials were given: set AWS_ENDPOINT_URL"
    with pytest.raises(ShardFormatError, match=hint), remote_errors("s3://b/x.tar", ShardFormatError):
        raise PermissionError("Forbidden")
    with pytest.raises(ShardFormatError) as given, remote_errors("s3://b/x.tar", ShardFormatError, options={"key": 1}):
        raise PermissionError("Forbidden")
    assert "no S3 endpoint" not in str(given.value)
