"""Resolving directories, manifests, brace patterns and URL lists into shard sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ManifestError, ShardFormatError
from pipeline.io.shard_sets import resolve_shards


def test_root_directory_gives_every_split_train_first(vimh_shards: Path) -> None:
    sets = resolve_shards(str(vimh_shards))
    assert [s.label for s in sets] == ["train", "test"]
    assert [len(s.urls) for s in sets] == [3, 1]
    assert sets[0].manifest is not None and sets[0].manifest.num_samples == 40


def test_split_filter_directory_manifest_and_file_url(vimh_shards: Path) -> None:
    assert [s.label for s in resolve_shards(str(vimh_shards), split="test")] == ["test"]
    by_dir = resolve_shards(str(vimh_shards / "train"))[0]
    by_manifest = resolve_shards(str(vimh_shards / "train" / "manifest.json"))[0]
    by_url = resolve_shards(f"file://{vimh_shards}/train")[0]
    assert by_dir.urls == by_manifest.urls
    assert [u.rsplit("/", 1)[-1] for u in by_url.urls] == [u.rsplit("/", 1)[-1] for u in by_dir.urls]


def test_brace_pattern_and_lists(vimh_shards: Path) -> None:
    pattern = str(vimh_shards / "train" / "train-{000000..000002}.tar")
    (single,) = resolve_shards(pattern)
    assert single.manifest is None and len(single.urls) == 3
    (listed,) = resolve_shards([str(vimh_shards / "train" / "train-000001.tar")])
    assert len(listed.urls) == 1


def test_missing_and_bad_sources(tmp_path: Path, vimh_shards: Path) -> None:
    with pytest.raises(ShardFormatError, match=r"nowhere: no such file or directory"):
        resolve_shards(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardFormatError, match=r"empty: no shards found"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(ShardFormatError, match=r"no split 'val' found"):
        resolve_shards(str(vimh_shards), split="val")
    bad = tmp_path / "manifest.json"
    bad.write_text('{"shards": 3}')
    with pytest.raises(ManifestError, match=r"manifest.json: expected an object with 'schema' and 'shards'"):
        resolve_shards(str(bad))
    with pytest.raises(ManifestError, match=r"missing.json: manifest not found"):
        resolve_shards(str(tmp_path / "missing.json"))
