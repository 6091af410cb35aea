"""The local copy of remote shards stays within its size limit, least recently used first."""

from __future__ import annotations

import os
import time
from pathlib import Path

import boto3
import fsspec

from pipeline import make_loader
from pipeline.io.disk_cache import PARTIAL, cache_name, cached, evict
from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh


def sizes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def test_copies_are_kept_and_reused(tmp_path: Path) -> None:
    calls = []

    def fetch() -> bytes:
        calls.append(1)
        return b"x" * 100

    assert cached("s3://b/a.tar", {}, str(tmp_path), fetch, limit=1000) == b"x" * 100
    assert cached("s3://b/a.tar", {}, str(tmp_path), fetch, limit=1000) == b"x" * 100
    assert len(calls) == 1
    assert (tmp_path / cache_name("s3://b/a.tar", {})).is_file()


def test_the_least_recently_used_copies_go_first(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        cached(f"s3://b/{name}.tar", {}, str(tmp_path), lambda: b"x" * 400, limit=1000)
        time.sleep(0.01)
    assert sorted(p.name.split("-", 1)[1] for p in tmp_path.iterdir()) == ["b.tar", "c.tar"]
    assert sizes(tmp_path) <= 1000
    os.utime(tmp_path / cache_name("s3://b/b.tar", {}))  # b used again: c is now the oldest
    time.sleep(0.01)
    cached("s3://b/b.tar", {}, str(tmp_path), lambda: b"never fetched", limit=1000)
    cached("s3://b/d.tar", {}, str(tmp_path), lambda: b"y" * 400, limit=1000)
    assert sorted(p.name.split("-", 1)[1] for p in tmp_path.iterdir()) == ["b.tar", "d.tar"]


def test_a_shard_larger_than_the_limit_is_returned_not_kept(tmp_path: Path) -> None:
    assert cached("s3://b/big.tar", {}, str(tmp_path), lambda: b"z" * 2000, limit=1000) == b"z" * 2000
    assert not list(tmp_path.iterdir())


def test_a_copy_evicted_by_another_process_is_a_miss(tmp_path: Path, monkeypatch) -> None:
    cached("s3://b/a.tar", {}, str(tmp_path), lambda: b"old", limit=1000)
    (tmp_path / cache_name("s3://b/a.tar", {})).unlink()  # another worker's eviction
    assert cached("s3://b/a.tar", {}, str(tmp_path), lambda: b"new", limit=1000) == b"new"


def test_partial_copies_left_by_killed_processes_are_evicted_when_old(tmp_path: Path) -> None:
    stale, fresh = tmp_path / f"{PARTIAL}stale", tmp_path / f"{PARTIAL}fresh"
    stale.write_bytes(b"s" * 600)
    fresh.write_bytes(b"f" * 10)
    os.utime(stale, (0, 0))
    evict(tmp_path, limit=100)
    assert not stale.exists() and fresh.exists()


def test_the_loader_keeps_its_cache_within_the_limit(tmp_path: Path, s3_options) -> None:
    """A real S3 endpoint (moto): two epochs through a cache smaller than the shard set."""
    src = generate_vimh(tmp_path / "vimh-8x8x1_c", n_train=64, n_test=4, height=8, width=8, channels=1)
    convert("vimh", src, tmp_path / "out", max_samples=16)
    boto3.client("s3", endpoint_url=s3_options["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="cache-bucket")
    fs = fsspec.filesystem("s3", **s3_options)
    fs.put(str(tmp_path / "out") + "/", "cache-bucket/vimh/", recursive=True)
    fs.invalidate_cache()
    shard_bytes = max(p.stat().st_size for p in (tmp_path / "out" / "train").glob("*.tar"))
    cache = tmp_path / "cache"
    loader = make_loader("s3://cache-bucket/vimh", batch_size=8, num_workers=0, storage_options=s3_options,
                         cache_dir=str(cache), cache_limit=2 * shard_bytes, with_keys=True)
    for _ in range(2):
        keys = [k for _, _, batch in loader for k in batch]
        assert len(keys) == len(set(keys)) == 64
        assert 0 < sizes(cache) <= 2 * shard_bytes
