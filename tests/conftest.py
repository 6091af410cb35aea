"""Shared fixtures: small sources in the real on-disk formats, converted shard sets."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest

from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh


def read_vimh_source(src: Path, split: str) -> dict[int, tuple[bytes, dict[int, int]]]:
    """Independent reader of a VIMH split (test oracle): index -> (CHW pixels, {id: q})."""
    pickled = src / f"{split}_batch"
    if pickled.exists():
        batch = pickle.loads(pickled.read_bytes())
        return {i: (bytes(row.tobytes()), dict(zip(lab[1::2], lab[2::2], strict=True)))
                for i, (row, lab) in enumerate(zip(batch["data"], batch["vimh_labels"], strict=True))}
    info = json.loads((src / "vimh_dataset_info.json").read_text())
    header = info["label_encoding"]["metadata_bytes"]
    buf, out, off = (src / split).read_bytes(), {}, 0
    while off < len(buf):
        h, w, c = struct.unpack_from("<HHH", buf, off)
        n = buf[off + header]
        pairs = buf[off + header + 1: off + header + 1 + 2 * n]
        start = off + header + 1 + 2 * n
        out[len(out)] = (buf[start:start + h * w * c], dict(zip(pairs[0::2], pairs[1::2], strict=True)))
        off = start + h * w * c
    return out


def no_output(out: Path) -> bool:
    """Nothing under ``out`` looks like a shard set (no shard, no manifest)."""
    return not list(out.rglob("*.tar")) and not list(out.rglob("manifest.json"))


def convert_validated(fmt: str, src: Path, out: Path, splits: dict[str, int], **kwargs: object) -> dict:
    """Convert, then require the validator (decoding every image) to find nothing wrong."""
    from shard_tools.validate import validate

    manifests = convert(fmt, src, out, **kwargs)  # type: ignore[arg-type]
    report = validate(str(out), decode=True, progress=False)
    assert report.ok, [str(p) for p in report.problems]
    assert report.splits == splits
    return manifests


@pytest.fixture
def vimh_source(tmp_path: Path):
    """Factory: a synthetic VIMH source directory in the real on-disk format."""
    def make(name: str = "vimh-8x8x3_test", **kwargs: object) -> Path:
        kwargs.setdefault("n_train", 40)
        kwargs.setdefault("n_test", 12)
        h, w, c = (int(x) for x in name.split("_")[0].removeprefix("vimh-").split("x"))
        kwargs.setdefault("height", h)
        kwargs.setdefault("width", w)
        kwargs.setdefault("channels", c)
        return generate_vimh(tmp_path / "src" / name, **kwargs)  # type: ignore[arg-type]
    return make


@pytest.fixture
def vimh_shards(tmp_path: Path, vimh_source) -> Path:
    """A converted VIMH shard set: 3 train shards of 16/16/8 samples, 1 test shard."""
    src = vimh_source()
    out = tmp_path / "shards"
    convert("vimh", src, out, max_samples=16)
    return out



@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint over HTTP: moto's server on 127.0.0.1 and a free port."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_options(s3_endpoint: str, monkeypatch) -> dict:
    """s3fs storage options for the moto endpoint (and no credentials from the environment)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}
