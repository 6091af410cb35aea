"""The validator on real shards corrupted in every way at once: it must report each."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image

from pipeline.format.schema import DatasetSchema, Head, ImageSpec
from pipeline.format.tar_write import tar_end, tar_member
from shard_tools.cli import main
from shard_tools.convert import convert
from shard_tools.validate import validate
from shard_tools.writer import ShardWriter

Members = list[tuple[str, bytes]]


def rewrite(shard: Path, edit: Callable[[Members], Members]) -> None:
    """Rewrite a shard's members through ``edit``, as a well-formed tar."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    blob = b"".join(tar_member(name, data) for name, data in edit(members))
    shard.write_bytes(blob + tar_end(len(blob)))


def reasons(report) -> list[str]:
    return [str(p) for p in report.problems]


@pytest.fixture
def shards(tmp_path: Path, vimh_source) -> Path:
    out = tmp_path / "shards"
    convert("vimh", vimh_source(), out, max_samples=10)
    assert validate(str(out), decode=True, progress=False).ok
    return out


def test_sound_shards_pass(shards: Path) -> None:
    report = validate(str(shards), progress=False)
    assert report.ok and report.shards == 6 and report.samples == 52


def test_every_problem_is_reported_at_once(shards: Path) -> None:
    train = shards / "train"
    # 1. flip bytes inside the first image of shard 0 (raw pixels: only the sha256 tells)
    data = bytearray((train / "train-000000.tar").read_bytes())
    data[1024 + 512 + 10] ^= 0xFF
    (train / "train-000000.tar").write_bytes(bytes(data))
    # 2. truncate shard 1 in the middle of a member
    whole = (train / "train-000001.tar").read_bytes()
    (train / "train-000001.tar").write_bytes(whole[: len(whole) // 2 + 100])
    # 3. drop one label member and push another label out of range in shard 2
    def break_labels(members: Members) -> Members:
        dropped = members[2][0]
        bad = msgpack.unpackb(members[4][1])
        bad["note_number"]["class"] = 99
        members[4] = (members[4][0], msgpack.packb(bad))
        return [m for m in members if m[0] != dropped]
    rewrite(train / "train-000002.tar", break_labels)
    # 4. delete shard 3, which the manifest lists
    (train / "train-000003.tar").unlink()
    # 5. change the header of the test shard
    def rename_dataset(members: Members) -> Members:
        header = json.loads(members[0][1])
        header["name"] = "something-else"
        return [(members[0][0], json.dumps(header).encode()), *members[1:]]
    rewrite(shards / "test" / "test-000000.tar", rename_dataset)

    found = reasons(validate(str(shards), progress=False))
    expect = [
        ("train-000000.tar", "manifest says sha256"),
        ("train-000001.tar", "tar structure broken"),
        ("train-000002.tar", "incomplete sample: missing its labels.msgpack member"),
        ("train-000002.tar", "class expected in 0..12, found 99"),
        ("train-000002.tar", "manifest says sha256"),
        ("train-000003.tar", "shard not found"),
        ("test-000000.tar", "header differs from the split's: name: expected"),
    ]
    for shard, reason in expect:
        assert any(shard in p and reason in p for p in found), (shard, reason, found)


def test_truncation_at_a_member_boundary_is_caught_without_a_manifest(shards: Path) -> None:
    shard = shards / "train" / "train-000000.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: 512 * 5])  # header member (2 blocks) + a complete 3-block image
    found = reasons(validate([str(shard)], progress=False))
    assert any("missing end-of-archive marker" in p for p in found), found
    assert any("missing its labels.msgpack member" in p for p in found), found


def test_unlisted_and_duplicate_shards_are_reported(shards: Path) -> None:
    train = shards / "train"
    (train / "train-000009.tar").write_bytes((train / "train-000000.tar").read_bytes())
    found = reasons(validate(str(train), progress=False))
    assert any("train-000009.tar" in p and "not listed in" in p for p in found), found
    found = reasons(validate([str(train / "train-000000.tar"), str(train / "train-000009.tar")],
                             progress=False))
    assert sum("duplicate sample key (also in" in p for p in found) == 10, found


def test_header_must_be_first(shards: Path) -> None:
    shard = shards / "test" / "test-000000.tar"
    rewrite(shard, lambda m: [m[1], m[2], m[0], *m[3:]])
    found = reasons(validate([str(shard)], progress=False))
    assert any("expected first member '__header__'" in p for p in found), found
    assert any("header as the first member only" in p for p in found), found


def test_missing_source_is_reported(tmp_path: Path) -> None:
    report = validate(str(tmp_path / "nowhere"), progress=False)
    assert not report.ok
    assert "no such file or directory" in reasons(report)[0]


def test_several_sources_are_each_counted(shards: Path, vimh_source, tmp_path: Path, capsys) -> None:
    """Split counts are by split name for one source; by each split's directory as its source
    names it when there are several (or names repeat), so they add up to the total."""
    other = tmp_path / "other"
    convert("vimh", vimh_source("vimh-8x8x3_other", n_train=20, n_test=6), other, max_samples=10)
    one = validate(str(shards), progress=False)
    assert one.splits == {"train": 40, "test": 12}
    report = validate([str(shards), str(other / "train" / "manifest.json"), f"{other}/test/"], progress=False)
    assert report.ok and report.samples == 78
    assert report.splits == {f"{shards}/train": 40, f"{shards}/test": 12, f"{other}/train": 20, f"{other}/test": 6}
    assert validate(f"{tmp_path}/{{shards,other}}", progress=False).splits == {
        f"{shards}/train": 40, f"{shards}/test": 12, f"{other}/train": 20, f"{other}/test": 6}
    renamed = tmp_path / "renamed"  # one root whose two split directories say the same split
    renamed.mkdir()
    shutil.copytree(shards / "train", renamed / "a")
    shutil.copytree(other / "train", renamed / "b")
    assert validate(str(renamed), progress=False).splits == {f"{renamed}/a": 40, f"{renamed}/b": 20}

    report_path = tmp_path / "report.json"
    assert main(["validate", str(shards), str(other), "-q", "--json", str(report_path)]) == 0
    assert (f"OK: {report.shards} shards, 78 samples, {report.bytes} bytes ({shards}/train: 40, {shards}/test: 12, "
            f"{other}/train: 20, {other}/test: 6)") in capsys.readouterr().out
    splits = json.loads(report_path.read_text())["splits"]
    assert splits == report.splits and sum(splits.values()) == 78


def test_a_split_without_its_manifest_is_labelled_by_its_directory_name(shards: Path, capsys) -> None:
    (shards / "train" / "manifest.json").unlink()
    report = validate(str(shards), progress=False)
    assert report.splits == {"train": 40, "test": 12}
    assert main(["validate", str(shards), "-q"]) == 1
    assert "1 problem(s): 6 shards, 52 samples" in (out := capsys.readouterr().out)
    assert "(train: 40, test: 12)" in out


def _png(height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_checks_encoded_images(tmp_path: Path) -> None:
    schema = DatasetSchema(name="pngs", split="train",
                           image=ImageSpec(height=4, width=4, channels=3, encoding="png", layout="HWC"),
                           heads=(Head(name="label", kind="class", num_classes=3),))
    labels = msgpack.packb({"label": {"class": 1}})
    with ShardWriter(tmp_path / "train", schema) as writer:
        writer.write("a", [("png", _png(4, 4)), ("labels.msgpack", labels)])
        writer.write("b", [("png", _png(5, 4)), ("labels.msgpack", labels)])
        writer.write("c", [("png", b"not a png"), ("labels.msgpack", labels)])
    assert validate(str(tmp_path / "train"), progress=False).ok
    found = reasons(validate(str(tmp_path / "train"), decode=True, progress=False))
    assert len(found) == 2, found
    assert "b.png: image expected HxWxC 4x4x3, found 5x4x3" in found[0]
    assert "c.png: image does not decode" in found[1]


def test_cli_exit_codes_and_json_report(shards: Path, tmp_path: Path, capsys) -> None:
    assert main(["validate", str(shards), "-q"]) == 0
    assert "OK: 6 shards, 52 samples" in capsys.readouterr().out
    (shards / "train" / "train-000003.tar").unlink()
    report_path = tmp_path / "report.json"
    assert main(["validate", str(shards), "-q", "--json", str(report_path)]) == 1
    report = json.loads(report_path.read_text())
    assert report["ok"] is False
    assert report["problems"][0]["reason"] == "shard not found"
