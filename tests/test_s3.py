"""Shards on a real S3 endpoint (moto's server over HTTP on 127.0.0.1), read through s3fs."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3
import pytest
import requests
import s3fs
import torch

from pipeline import make_loader
from pipeline.errors import ShardFormatError
from shard_tools.convert import convert
from shard_tools.validate import validate


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path: Path, monkeypatch) -> None:
    """Conversions to S3 build their shards under $XDG_CACHE_HOME: keep that in tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def bucket(tmp_path: Path, vimh_source, s3_options: dict) -> tuple[str, Path]:
    """Converted shards uploaded to a fresh bucket; returns (s3 root URL, local root)."""
    out = tmp_path / "shards"
    convert("vimh", vimh_source(), out, max_samples=16)
    name = f"b{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_options["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
    fs = s3fs.S3FileSystem(**s3_options)
    fs.put(str(out) + "/", f"{name}/shards/", recursive=True)
    fs.invalidate_cache()
    return f"s3://{name}/shards", out


def batches(loader) -> list[tuple[list[str], torch.Tensor]]:
    return [(keys, images) for images, _, keys in loader]


def test_s3_gives_the_same_samples_as_local(bucket, s3_options: dict, tmp_path: Path) -> None:
    url, local = bucket
    remote = make_loader(url, batch_size=8, num_workers=2, seed=5, with_keys=True, storage_options=s3_options,
                         cache_dir=str(tmp_path / "cache"))
    here = make_loader(str(local), batch_size=8, num_workers=2, seed=5, with_keys=True)
    got, want = batches(remote), batches(here)
    assert [k for k, _ in got] == [k for k, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))
    assert len(list((tmp_path / "cache").glob("*.tar"))) == 3


def test_validate_reads_s3(bucket, s3_options: dict) -> None:
    url, _ = bucket
    from shard_tools import validate as validate_module

    report = validate_module.validate(url, progress=False, storage_options=s3_options)
    assert report.ok and report.splits == {"train": 40, "test": 12}
    assert validate is validate_module.validate


def test_missing_object_is_named(bucket, s3_options: dict) -> None:
    url, _ = bucket
    s3fs.S3FileSystem(**s3_options).rm(url.removeprefix("s3://") + "/train/train-000001.tar")
    with pytest.raises(ShardFormatError, match=r"train/train-000001.tar: shard not found"):
        make_loader(url, batch_size=8, num_workers=0, storage_options=s3_options)


def test_bad_credentials_are_named(bucket, s3_endpoint: str, s3_options: dict) -> None:
    url, _ = bucket
    bad = {**s3_options, "key": "nobody", "secret": "wrong"}
    requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"0", timeout=10)
    try:
        with pytest.raises(ShardFormatError, match=r"train/manifest.json: access denied \(.*\); check the credentials"):
            make_loader(url + "/train/manifest.json", batch_size=8, num_workers=0, storage_options=bad)
        with pytest.raises(ShardFormatError, match=r"shards: access denied \(.*\); check the credentials"):
            make_loader(url, batch_size=8, num_workers=0, storage_options=bad)
    finally:
        requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"1e30", timeout=10)


def test_conversion_straight_to_s3(tmp_path: Path, vimh_source, s3_options: dict) -> None:
    name = f"out{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_options["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
    src = vimh_source()
    manifests = convert("vimh", src, f"s3://{name}/vimh", max_samples=16, storage_options=s3_options)
    local = convert("vimh", src, tmp_path / "local", max_samples=16)
    fs = s3fs.S3FileSystem(**s3_options)
    assert set(manifests) == set(local) == {"train", "test"}
    for split, manifest in local.items():
        here = tmp_path / "local" / split
        assert fs.cat(f"{name}/vimh/{split}/manifest.json") == (here / "manifest.json").read_bytes()
        for shard in manifest.shards:
            assert fs.cat(f"{name}/vimh/{split}/{shard.name}") == (here / shard.name).read_bytes()
    assert not fs.glob(f"{name}/vimh/*/.staging/*")
    report = validate(f"s3://{name}/vimh", progress=False, storage_options=s3_options)
    assert report.ok and report.splits == {"train": 40, "test": 12}


def test_failed_upload_leaves_no_manifest(tmp_path: Path, vimh_source, s3_options: dict, monkeypatch) -> None:
    from pipeline.errors import ConversionError

    name = f"out{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_options["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)

    async def broken_copy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(s3fs.S3FileSystem, "_copy", broken_copy)
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(ConversionError, match=r"/train: upload failed \(connection reset by peer\); no manifest"):
        convert("vimh", vimh_source(), f"s3://{name}/vimh", max_samples=16, storage_options=s3_options)
    assert list((tmp_path / "cache" / "multihead-shards" / "convert").glob("*/train/manifest.json"))  # kept
    fs = s3fs.S3FileSystem(**s3_options)
    fs.invalidate_cache()
    assert not fs.glob(f"{name}/vimh/*/manifest.json") and not fs.glob(f"{name}/vimh/*/*.tar")


def test_interrupted_upload_resumes_with_the_missing_shards(tmp_path: Path, vimh_source, s3_options: dict,
                                                            monkeypatch) -> None:
    import shard_tools.convert as convert_module
    from pipeline.errors import ConversionError

    name = f"out{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_options["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
    src, work, url = vimh_source(), tmp_path / "work", f"s3://{name}/vimh"
    work.mkdir()
    (work / "mine.txt").write_text("not the converter's")  # a user's --work-dir: only our subdirectory goes
    real_put, real_stage = s3fs.S3FileSystem._put_file, convert_module.stage_split
    puts: list[str] = []
    staged: list[str] = []

    async def counted_put(self, lpath, rpath, *args, **kwargs):  # type: ignore[no-untyped-def]
        puts.append(Path(rpath).name)
        if fail_after is not None and len(puts) > fail_after:
            raise ConnectionResetError("connection reset by peer")
        return await real_put(self, lpath, rpath, *args, **kwargs)

    def counted_stage(source, *args, **kwargs):  # type: ignore[no-untyped-def]
        staged.append(source.split)
        return real_stage(source, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", counted_put)
    monkeypatch.setattr(convert_module, "stage_split", counted_stage)
    s3fs.S3FileSystem.clear_instance_cache()
    fail_after: int | None = 2  # train has 3 shards of 16, 16, 8: the third upload fails
    with pytest.raises(ConversionError, match=r"upload failed \(connection reset by peer\); no manifest was "
                                              r"written there, and running the same conversion again uploads"):
        convert("vimh", src, url, max_samples=16, storage_options=s3_options, work_dir=work)
    assert sorted(staged) == ["test", "train"] and list(work.glob("shards-work-*/train/manifest.json"))
    fail_after, puts[:], staged[:] = None, [], []
    s3fs.S3FileSystem.clear_instance_cache()
    manifests = convert("vimh", src, url, max_samples=16, storage_options=s3_options, work_dir=work)
    assert staged == []  # converted completely the first time: not converted again
    assert sorted(puts) == ["test-000000.tar", "train-000002.tar"]  # only what the first upload lacked
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]
    local = convert("vimh", src, tmp_path / "local", max_samples=16)
    fs = s3fs.S3FileSystem(**s3_options)
    fs.invalidate_cache()
    for split, manifest in local.items():
        assert manifests[split] == manifest
        for shard in manifest.shards:
            assert fs.cat(f"{name}/vimh/{split}/{shard.name}") == (tmp_path / "local" / split / shard.name).read_bytes()
    assert not fs.glob(f"{name}/vimh/*/.staging/**")
    puts[:] = []
    convert("vimh", src, url, max_samples=16, storage_options=s3_options, work_dir=work)
    assert puts == []  # the same conversion again: already published, byte for byte


def test_another_conversions_staged_shards_are_never_published(tmp_path: Path, vimh_source, s3_options: dict,
                                                               monkeypatch) -> None:
    """Run A (seed 0) fails after two shards, run B (seed 1, same OUT, shards of the same
    sizes) after one; A again must publish A's bytes, not B's staged shard."""
    from pipeline.errors import ConversionError

    name = f"out{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_options["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
    src, url = vimh_source(), f"s3://{name}/vimh"
    real_put = s3fs.S3FileSystem._put_file
    budget = {"puts": 0}

    async def limited_put(self, lpath, rpath, *args, **kwargs):  # type: ignore[no-untyped-def]
        if budget["puts"] <= 0:
            raise ConnectionResetError("connection reset by peer")
        budget["puts"] -= 1
        return await real_put(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", limited_put)
    for seed, puts in ((0, 2), (1, 1)):
        budget["puts"] = puts
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(ConversionError, match="upload failed"):
            convert("vimh", src, url, max_samples=16, seed=seed, storage_options=s3_options, work_dir=tmp_path / "w")
    budget["puts"] = 100
    s3fs.S3FileSystem.clear_instance_cache()
    convert("vimh", src, url, max_samples=16, seed=0, storage_options=s3_options, work_dir=tmp_path / "w")
    local = convert("vimh", src, tmp_path / "local", max_samples=16, seed=0)
    fs = s3fs.S3FileSystem(**s3_options)
    fs.invalidate_cache()
    for shard in local["train"].shards:
        assert fs.cat(f"{name}/vimh/train/{shard.name}") == (tmp_path / "local" / "train" / shard.name).read_bytes()


def test_work_dir_is_only_for_urls(tmp_path: Path, vimh_source) -> None:
    from pipeline.errors import ConversionError

    with pytest.raises(ConversionError, match=r"work_dir: only used when OUT is a URL; .*out is a local directory"):
        convert("vimh", vimh_source(), tmp_path / "out", work_dir=tmp_path / "w")


def test_a_second_run_of_the_same_conversion_to_s3_fails_at_once(tmp_path: Path, vimh_source, s3_options: dict) -> None:
    """Two runs to one URL would share a work directory: the second fails, naming the first."""
    from pipeline.errors import ConversionError
    from shard_tools.conversion.locks import conversion_lock
    from shard_tools.conversion.remote import work_directory

    url, work = f"s3://out{uuid.uuid4().hex[:10]}/vimh", tmp_path / "w"
    with conversion_lock(work_directory(url, ["test", "train"], work)), \
            pytest.raises(ConversionError, match=r"\.convert\.lock: another conversion \(process \d+ or its worker "
                                                 r"processes\) is writing"):
        convert("vimh", vimh_source(), url, max_samples=16, storage_options=s3_options, work_dir=work)


def test_mix_sources_carry_their_own_storage_options(bucket, s3_options: dict) -> None:
    """One source on S3 and one local, each with its own options: the mix's options (here an
    endpoint nothing listens on) are used only by sources that give none."""
    from pipeline import MixSource, mix
    from pipeline.errors import PipelineError

    url, local = bucket
    nowhere = {**s3_options, "client_kwargs": {"endpoint_url": "http://127.0.0.1:1", "region_name": "us-east-1"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    sources = [MixSource(url, weight=0.5, name="remote", storage_options=s3_options),
               MixSource(str(local), weight=0.5, name="local", storage_options={})]
    loader = mix(sources, batch_size=8, epoch_samples=32, num_workers=2, storage_options=nowhere, with_keys=True)
    seen = {int(d) for _, labels, _ in loader for d in labels["dataset"].tolist()}
    assert seen == {0, 1} and sum(len(keys) for _, _, keys in loader) == 32
    with pytest.raises(PipelineError, match=r"s3://.*: unreachable \(Could not connect to .*http://127\.0\.0\.1:1/"):
        mix([MixSource(url, weight=1.0)], batch_size=8, epoch_samples=32, num_workers=0, storage_options=nowhere)
