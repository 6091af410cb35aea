"""``shards manifest DIR`` rebuilds a missing or stale manifest, after checking the shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import ConversionError, ManifestError, make_loader
from shard_tools.cli import main
from shard_tools.convert import convert
from shard_tools.manifests import rebuild_manifest, write_manifests


@pytest.fixture
def shards(tmp_path: Path, vimh_source) -> Path:
    out = tmp_path / "out"
    convert("vimh", vimh_source(), out, max_samples=16)
    return out


def test_shards_copied_without_their_manifests_load_again(shards: Path, capsys) -> None:
    originals = {split: (shards / split / "manifest.json").read_text() for split in ("train", "test")}
    for split in originals:
        (shards / split / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"no manifest.json: the split is incomplete"):
        make_loader(str(shards), batch_size=8, num_workers=0)
    assert main(["manifest", str(shards)]) == 0
    assert "train: 40 samples in 3 shards, manifest rebuilt" in capsys.readouterr().out
    for split, text in originals.items():
        assert (shards / split / "manifest.json").read_text() == text  # byte for byte what the conversion wrote
    assert sum(len(images) for images, _ in make_loader(str(shards), batch_size=8, num_workers=0)) == 40


def test_a_stale_manifest_is_rebuilt_and_a_current_one_kept(shards: Path) -> None:
    split = shards / "train"
    shutil.copy(split / "train-000000.tar", split / "train-000003.tar")  # a fourth shard the manifest lacks...
    with pytest.raises(ConversionError, match=r"duplicate sample key"):  # ...repeating the first: refused
        rebuild_manifest(split)
    (split / "train-000003.tar").unlink()
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["shards"][0]["samples"] = 15
    manifest["num_samples"] = 39
    (split / "manifest.json").write_text(json.dumps(manifest))
    assert write_manifests(shards)["train"][1] == "rebuilt"
    assert write_manifests(shards)["train"][1] == "up to date"
    assert json.loads((split / "manifest.json").read_text())["num_samples"] == 40


def test_broken_shards_get_no_manifest(shards: Path) -> None:
    split = shards / "train"
    (split / "manifest.json").unlink()
    (split / "train-000001.tar").write_bytes((split / "train-000001.tar").read_bytes()[:5000])
    with pytest.raises(ConversionError, match=r"problem\(s\) in its shards, so no manifest was written: .*"
                                              r"train-000001.tar"):
        write_manifests(shards)
    assert not (split / "manifest.json").exists()


def test_an_unfinished_conversion_is_not_listed(shards: Path) -> None:
    (shards / "train" / "manifest.json").unlink()
    (shards / "train" / ".staging").mkdir()
    with pytest.raises(ConversionError, match=r"a conversion's .staging is there: it did not finish"):
        write_manifests(shards)


def test_nothing_to_list(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"no node manifests and no .tar files"):
        write_manifests(tmp_path)
