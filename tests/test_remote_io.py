"""Remote reads beyond S3: plain HTTP (a server on 127.0.0.1) and retries with backoff."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline import make_loader
from pipeline.errors import ShardFormatError
from pipeline.io.storage import read_shard


@pytest.fixture
def http_root(vimh_shards: Path):
    """The converted shard set served over HTTP on 127.0.0.1."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(vimh_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_loader_reads_a_manifest_over_http(http_root: str, vimh_shards: Path) -> None:
    remote = make_loader(f"{http_root}/train/manifest.json", batch_size=8, num_workers=0, seed=2, with_keys=True)
    local = make_loader(str(vimh_shards), batch_size=8, num_workers=0, seed=2, with_keys=True)
    assert [k for _, _, ks in remote for k in ks] == [k for _, _, ks in local for k in ks]


class FlakyFileSystem(MemoryFileSystem):
    """Fails the first ``failures`` opens with a transient error."""

    protocol = "flaky"
    failures = 0

    def _open(self, path, mode="rb", **kwargs):  # type: ignore[no-untyped-def]
        if FlakyFileSystem.failures > 0:
            FlakyFileSystem.failures -= 1
            raise ConnectionResetError("connection reset by peer")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def flaky():
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    with fsspec.open("flaky://bucket/shard.tar", "wb") as f:
        f.write(b"shard bytes")
    yield
    FlakyFileSystem.failures = 0


def test_transient_errors_are_retried_with_backoff(flaky, caplog) -> None:
    FlakyFileSystem.failures = 2
    assert read_shard("flaky://bucket/shard.tar", retries=3, backoff=0.01) == b"shard bytes"
    assert caplog.text.count("retry") == 2


class HiddenTimeoutFileSystem(MemoryFileSystem):
    """Fails the first ``failures`` opens the way s3fs 2026.9's ``S3File._fetch_range`` turns a
    read timeout into: an IndexError raised while handling an ``FSTimeoutError`` without args."""

    protocol = "hiddentimeout"
    failures = 0

    def _open(self, path, mode="rb", **kwargs):  # type: ignore[no-untyped-def]
        if HiddenTimeoutFileSystem.failures > 0:
            HiddenTimeoutFileSystem.failures -= 1
            from fsspec.exceptions import FSTimeoutError

            try:
                raise FSTimeoutError
            except OSError as ex:
                ex.args[0]  # s3fs: `if ex.args[0] == errno.EINVAL ...`
        return super()._open(path, mode, **kwargs)


def test_a_read_timeout_that_s3fs_hides_in_an_index_error_is_retried(caplog) -> None:
    fsspec.register_implementation("hiddentimeout", HiddenTimeoutFileSystem, clobber=True)
    with fsspec.open("hiddentimeout://bucket/shard.tar", "wb") as f:
        f.write(b"shard bytes")
    HiddenTimeoutFileSystem.failures = 1
    assert read_shard("hiddentimeout://bucket/shard.tar", retries=2, backoff=0.01) == b"shard bytes"
    assert caplog.text.count("retry") == 1
    HiddenTimeoutFileSystem.failures = 5
    with pytest.raises(ShardFormatError, match=r"hiddentimeout://bucket/shard.tar: read failed after 2 attempts "
                                               r"\(FSTimeoutError\)"):
        read_shard("hiddentimeout://bucket/shard.tar", retries=1, backoff=0.01)


def test_a_hidden_read_timeout_of_a_manifest_or_header_is_a_project_error() -> None:
    from pipeline.errors import ManifestError
    from pipeline.io.reading import read_header, read_manifest

    fsspec.register_implementation("hiddentimeout", HiddenTimeoutFileSystem, clobber=True)
    HiddenTimeoutFileSystem.failures = 1
    with pytest.raises(ManifestError, match=r"hiddentimeout://bucket/manifest.json: unreachable \(FSTimeoutError\)"):
        read_manifest("hiddentimeout://bucket/manifest.json")
    HiddenTimeoutFileSystem.failures = 1
    with pytest.raises(ShardFormatError, match=r"hiddentimeout://bucket/a.tar: unreachable \(FSTimeoutError\)"):
        read_header("hiddentimeout://bucket/a.tar")
    HiddenTimeoutFileSystem.failures = 0


def test_persistent_errors_give_up_with_the_url(flaky) -> None:
    FlakyFileSystem.failures = 10
    with pytest.raises(ShardFormatError, match=r"flaky://bucket/shard.tar: read failed after 3 attempts "
                                               r"\(connection reset by peer\)"):
        read_shard("flaky://bucket/shard.tar", retries=2, backoff=0.01)


def test_unreachable_endpoint_is_named(tmp_path: Path) -> None:
    options = {"key": "a", "secret": "b", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    with pytest.raises(ShardFormatError, match=r"s3://bucket/vimh: unreachable \(Could not connect"):
        make_loader("s3://bucket/vimh", batch_size=4, num_workers=0, storage_options=options)


def test_disk_cache_tells_endpoints_apart(tmp_path: Path, monkeypatch) -> None:
    """The same URL on two endpoints (two mix sources' options) is two cached objects."""
    import pipeline.io.storage as storage

    fetched: list[str] = []

    def fetch(url: str, options: dict, retries: int, backoff: float) -> bytes:
        endpoint = options["client_kwargs"]["endpoint_url"]
        fetched.append(endpoint)
        return endpoint.encode()

    monkeypatch.setattr(storage, "_fetch", fetch)
    one, two = ({"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}} for port in (1, 2))
    cache = str(tmp_path / "cache")
    for options in (one, two, one, two):
        assert read_shard("s3://bucket/a.tar", storage_options=options, cache_dir=cache) == \
            options["client_kwargs"]["endpoint_url"].encode()
    assert fetched == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
