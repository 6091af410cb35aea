"""Network faults between the loader and S3 (moto's server behind a TcpProxy, 127.0.0.1 only).

The promise under test: a remote epoch never loses, repeats or mislabels a sample silently.
Transient faults (connections reset, a few seconds of silence, a response broken off) are
survived with every sample exactly once, in the same order, with the same pixels and labels
as a fault-free local run of the same settings; lasting faults (an outage, a deleted object)
end the epoch with a ``PipelineError`` naming the shard, in bounded time.

Faults are placed by request count (``TcpProxy.on_request``), counted from the end of
``make_loader`` (whose own requests read the manifest and headers), so they land mid-epoch
whichever process (the test's, or a DataLoader worker) makes the request. Each shard read is
two requests (HEAD, then GET of the whole object); ``shuffle_buffer=16`` makes every window one
shard, so the reads are spread over the epoch instead of all made before its first batch.
"""

from __future__ import annotations

import copy
import gc
import re
import tarfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
import s3fs
import torch

from pipeline import make_loader
from pipeline.errors import PipelineError, ShardFormatError
from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(90)

N_TRAIN, PER_SHARD, BATCH, SEED, BUFFER = 160, 16, 8, 7, 16  # 10 shards, 20 batches
CONNECT_TIMEOUT = READ_TIMEOUT = 1.0
# botocore: one attempt per call and short timeouts, so that the loader's own `retries` decide
BOTO = {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT, "retries": {"total_max_attempts": 1}}
# A lasting outage with retries=1: 2 attempts 0.5 s apart, each a HEAD and a GET, each given up
# after the 1 s read timeout (connections to the proxy open at once): about 2 x 2 x 1 s + 0.5 s
# = 4.5 s; the bound leaves more than twice that for two busy cores. An error that comes later
# means requests are retried behind the loader's back (or hang). (Measured here: s3fs retries
# every timed-out request 5 times on its own, so one read takes 7 s with these settings, and
# 66 s with botocore's default retries even with a 1 s read timeout.)
OUTAGE_RETRIES = 1
OUTAGE_BOUND = 10.0
DELETED_BOUND = 2.0  # a 404 is not retried: the error must come at once
WORKERS = [pytest.param(0, id="in-process"), pytest.param(2, id="2-workers")]


# -- data and endpoints -------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults-network")
    src = generate_vimh(root / "src" / "vimh-8x8x3_faults", n_train=N_TRAIN, n_test=16, height=8, width=8,
                        channels=3, seed=11)
    convert("vimh", src, root / "shards", max_samples=PER_SHARD)
    return root / "shards"


@pytest.fixture(scope="module")
def split_keys(local_root: Path) -> Counter:
    """Every train sample key, read from the tar members (an oracle independent of the loader)."""
    keys: Counter = Counter()
    for shard in sorted((local_root / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys.update({m.name.split(".", 1)[0] for m in tar.getmembers() if not m.name.startswith("__")})
    assert sum(keys.values()) == N_TRAIN and len(keys) == N_TRAIN
    return keys


@pytest.fixture(scope="module")
def reference(local_root: Path) -> dict[int, list]:
    """The fault-free epoch of each worker count, read locally with the same settings."""
    loaders = [open_loader(str(local_root), workers) for workers in (0, 2)]
    epochs = {workers: list(loader) for workers, loader in zip((0, 2), loaders, strict=True)}
    release(loaders)
    return epochs


@pytest.fixture
def remote(local_root: Path, s3_options: dict) -> str:
    """The shard set in a fresh bucket of the moto server (uploaded directly, not via the proxy)."""
    bucket = f"faults{uuid.uuid4().hex[:12]}"
    s3_client(s3_options).create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(**s3_options)
    fs.put(str(local_root) + "/", f"{bucket}/shards/", recursive=True)
    fs.invalidate_cache()
    return f"s3://{bucket}/shards"


@pytest.fixture
def proxy(s3_endpoint: str):
    with TcpProxy(s3_endpoint) as p:
        yield p
    assert not p.alive_threads()


@pytest.fixture
def through_proxy(proxy: TcpProxy, s3_options: dict):
    """Factory of loaders reading through the proxy. The fixture keeps them until the test is
    over, then lets the proxy forward again before they go, so that their DataLoader workers
    (which may still be retrying a read) stop at once instead of in a later test."""
    loaders: list = []

    def make(source: str, workers: int, **kwargs: object):
        loaders.append(open_loader(source, workers, storage_options=through(proxy, s3_options), **kwargs))
        return loaders[-1]

    yield make
    proxy.forward()
    release(loaders)


def release(loaders: list) -> None:
    """Let go of the loaders, stopping their DataLoader workers in the background: after a
    worker has raised, torch's shutdown waits 5 s per worker before terminating it (torch 2.15,
    the same with a plain IterableDataset), which would otherwise stall whichever later test
    the garbage collector happens to run in."""
    for loader in loaders:
        threading.Thread(target=loader.close, name="loader-shutdown", daemon=True).start()
    loaders.clear()
    gc.collect()


def s3_client(options: dict):
    return boto3.client("s3", endpoint_url=options["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def through(proxy: TcpProxy, s3_options: dict) -> dict:
    """Storage options that reach moto through the proxy, with short botocore timeouts."""
    return {**s3_options, "client_kwargs": {**s3_options["client_kwargs"], "endpoint_url": proxy.url},
            "config_kwargs": copy.deepcopy(BOTO)}  # botocore adds to the retries dict it is given


def open_loader(source: str, workers: int, **kwargs: object):
    return make_loader(source, batch_size=BATCH, num_workers=workers, seed=SEED, shuffle_buffer=BUFFER,
                       with_keys=True, **kwargs)


# -- running an epoch with a deadline ----------------------------------------------------------
@dataclass
class Epoch:
    batches: list = field(default_factory=list)
    error: BaseException | None = None
    finished: bool = False
    started: float = 0.0
    ended: float = 0.0


def run_epoch(loader, limit: float) -> Epoch:
    """One pass over ``loader`` in a thread; gives up waiting after ``limit`` seconds (the
    thread then ends by itself once the proxy stops and every request is refused)."""
    epoch = Epoch(started=time.monotonic())

    def target() -> None:
        try:
            for batch in loader:
                epoch.batches.append(batch)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            epoch.error = e
        epoch.ended = time.monotonic()
        epoch.finished = True

    thread = threading.Thread(target=target, name="epoch", daemon=True)
    thread.start()
    thread.join(limit)
    return epoch


def assert_same_epoch(got: list, want: list) -> None:
    """Same batches in the same order: keys, pixels and every label tensor."""
    assert [keys for _, _, keys in got] == [keys for _, _, keys in want]
    for (images, labels, keys), (want_images, want_labels, _) in zip(got, want, strict=True):
        assert torch.equal(images, want_images), keys
        assert labels.keys() == want_labels.keys()
        for head in labels:
            assert torch.equal(labels[head], want_labels[head]), (head, keys)


def assert_exactly_once(got: list, split_keys: Counter) -> None:
    seen = Counter(k for _, _, keys in got for k in keys)
    assert seen == split_keys, f"missing {sorted(split_keys - seen)[:5]}, repeated {sorted(seen - split_keys)[:5]}"


def ok(epoch: Epoch, limit: float) -> Epoch:
    assert epoch.finished, f"the epoch neither ended nor failed within {limit} s"
    if epoch.error is not None:
        raise AssertionError(f"the epoch failed: {epoch.error!r}") from epoch.error
    return epoch


# -- the proxy itself --------------------------------------------------------------------------
def _get(url: str, timeout: float = 5.0) -> bytes:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        return conn.getresponse().read()
    finally:
        conn.close()


@pytest.fixture
def http_target():
    """A plain HTTP server on 127.0.0.1 answering every GET with 100 kB."""
    import http.server

    body = bytes(range(256)) * 400

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.handle_error = lambda *args: None  # type: ignore[method-assign]  # clients reset on purpose
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", body
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.timeout(30)
def test_proxy_forwards_drops_blackholes_and_cuts(http_target) -> None:
    import http.client

    target, body = http_target
    with pytest.raises(ValueError, match=r"127\.0\.0\.1 only"):
        TcpProxy("http://10.0.0.1:80")
    proxy = TcpProxy(target).start()
    try:
        assert _get(proxy.url + "/a") == body and proxy.requests == ["GET /a HTTP/1.1"]
        proxy.set_mode("drop", connections=2)
        for _ in range(2):
            with pytest.raises((ConnectionError, http.client.HTTPException)):
                _get(proxy.url + "/refused")
        assert proxy.refused == 2 and proxy.mode == "pass"
        assert _get(proxy.url + "/b") == body
        proxy.blackhole(0.6)
        start = time.monotonic()
        assert _get(proxy.url + "/held") == body
        assert 0.5 <= time.monotonic() - start < 3
        with pytest.raises(TimeoutError):  # a blackhole longer than the client waits
            proxy.blackhole(5)
            _get(proxy.url + "/silent", timeout=0.3)
        proxy.forward()  # the held request now reaches the server, after its client left
        deadline = time.monotonic() + 5
        while proxy.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.requests[-1] == "GET /silent HTTP/1.1"
        proxy.cut(1000)
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            _get(proxy.url + "/cut")
        assert proxy.cut_responses == 1 and _get(proxy.url + "/whole") == body
        fired: list[str] = []
        proxy.on_request(2, fired.append, match=r"^GET /x")
        for path in ("/x1", "/y", "/x2", "/x3"):
            _get(proxy.url + path)
        assert fired == ["GET /x2 HTTP/1.1"]
        proxy.on_request(1, lambda _: proxy.drop(connections=0))  # open connections only
        with pytest.raises((ConnectionError, http.client.HTTPException)):  # the request that fires it is reset
            _get(proxy.url + "/dropped")
        assert proxy.reset_open >= 1 and _get(proxy.url + "/after") == body
    finally:
        proxy.stop()
    assert not proxy.alive_threads()
    with pytest.raises(ConnectionError):
        _get(proxy.url + "/stopped")


# -- transient faults: survived, every sample once, in order --------------------------------------
@pytest.mark.parametrize("workers", WORKERS)
def test_connections_dropped_mid_epoch_lose_and_repeat_nothing(workers: int, remote: str, proxy: TcpProxy,
                                                               through_proxy, reference, split_keys) -> None:
    # three drops can fail one read at most 3 x (its open connection + 2 new ones) = 9 times, when
    # a read's retries meet the next drop (it happened on a loaded machine with the default 3)
    loader = through_proxy(remote, workers, retries=9)
    for n in (3, 8, 13):  # three times mid-epoch: every open connection reset, then the next two new ones
        proxy.on_request(n, lambda _: proxy.drop(connections=2))
    epoch = ok(run_epoch(loader, limit=30), 30)
    assert proxy.refused == 6 and proxy.reset_open >= 3  # the faults did hit the epoch's reads
    assert_same_epoch(epoch.batches, reference[workers])
    assert_exactly_once(epoch.batches, split_keys)


@pytest.mark.parametrize("workers", WORKERS)
def test_blackhole_mid_epoch_is_waited_out(workers: int, remote: str, proxy: TcpProxy, through_proxy,
                                           reference, split_keys) -> None:
    """3 s of silence (read timeout 1 s, loader retries 3 with 0.5/1/2 s backoff)."""
    loader = through_proxy(remote, workers)
    fired: list[float] = []
    proxy.on_request(5, lambda _: (fired.append(time.monotonic()), proxy.blackhole(3.0)))
    epoch = ok(run_epoch(loader, limit=25), 25)
    assert fired and epoch.ended - fired[0] >= 2.9  # the epoch did wait for the silence to end
    assert_same_epoch(epoch.batches, reference[workers])
    assert_exactly_once(epoch.batches, split_keys)


@pytest.mark.parametrize("workers", WORKERS)
def test_responses_broken_off_mid_body_are_read_again(workers: int, remote: str, proxy: TcpProxy,
                                                      through_proxy, reference, split_keys) -> None:
    """Two shard downloads cut after 2000 of their ~40 kB (a reset mid-body): a short read
    must be read again, never indexed as a shard with fewer samples."""
    loader = through_proxy(remote, workers)
    for n in (2, 6):
        proxy.on_request(n, lambda _: proxy.cut(2000, responses=1), match=r"^GET .*\.tar ")
    epoch = ok(run_epoch(loader, limit=30), 30)
    assert proxy.cut_responses == 2
    assert_same_epoch(epoch.batches, reference[workers])
    assert_exactly_once(epoch.batches, split_keys)


# -- lasting faults: a named project error, in bounded time ----------------------------------------
OUTAGES = {
    "reset": lambda proxy: proxy.drop(),                 # every connection reset, from now on
    "blackhole": lambda proxy: proxy.blackhole(),        # connections accepted, nothing ever answered
    "cut": lambda proxy: proxy.cut(2000, responses=None),  # every response broken off mid-body
}


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", sorted(OUTAGES))
def test_permanent_outage_ends_with_a_named_error_in_bounded_time(kind: str, workers: int, remote: str,
                                                                  proxy: TcpProxy, through_proxy,
                                                                  reference) -> None:
    loader = through_proxy(remote, workers, retries=OUTAGE_RETRIES)
    fired: list[float] = []
    proxy.on_request(5, lambda _: (fired.append(time.monotonic()), OUTAGES[kind](proxy)))
    epoch = run_epoch(loader, limit=OUTAGE_BOUND + 2)
    assert fired, "the outage never started: the epoch made fewer requests than planned"
    assert epoch.finished, f"{kind} outage: no error within {OUTAGE_BOUND + 2:.0f} s (a hang, or hidden retries)"
    with pytest.raises(PipelineError, match=rf"{re.escape(remote)}/train/train-\d{{6}}\.tar"):
        raise epoch.error or AssertionError(f"{kind} outage: the epoch ended without an error")
    assert epoch.ended - fired[0] < OUTAGE_BOUND, f"{kind} outage: the error took {epoch.ended - fired[0]:.1f} s"
    got = epoch.batches  # whatever came before the error is the epoch's beginning, unchanged
    assert_same_epoch(got, reference[workers][:len(got)])


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_object_deleted_mid_epoch_is_named_at_once(method: str, workers: int, remote: str, proxy: TcpProxy,
                                                   through_proxy, s3_options: dict, reference) -> None:
    """The third shard the epoch reads is deleted just before its HEAD (or its GET) reaches S3."""
    loader = through_proxy(remote, workers)
    s3 = s3_client(s3_options)
    deleted: dict[str, object] = {}

    def delete(request_line: str) -> None:
        bucket, key = request_line.split()[1].lstrip("/").split("/", 1)
        s3.delete_object(Bucket=bucket, Key=key)
        deleted.update(url=f"s3://{bucket}/{key}", at=time.monotonic())

    proxy.on_request(3, delete, match=rf"^{method} /\S+\.tar ")
    epoch = run_epoch(loader, limit=30)
    assert deleted and epoch.finished
    with pytest.raises(ShardFormatError, match=rf"{re.escape(str(deleted['url']))}: shard not found"):
        raise epoch.error or AssertionError("the epoch ended without an error")
    assert epoch.ended - float(deleted["at"]) < DELETED_BOUND  # type: ignore[arg-type]
    got = epoch.batches
    assert_same_epoch(got, reference[workers][:len(got)])
