"""Per-split manifest: the schema plus the name, sample count, size and sha256 of each shard."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.errors import ManifestError, SchemaError
from pipeline.schema import DatasetSchema
from pipeline.storage import REMOTE_ERRORS

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it (``name`` is relative to the manifest)."""

    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    schema: DatasetSchema
    shards: tuple[ShardInfo, ...]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        data = {"schema": self.schema.to_dict(), "num_samples": self.num_samples,
                "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes,
                            "sha256": s.sha256} for s in self.shards]}
        return json.dumps(data, sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = MANIFEST_NAME) -> Manifest:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where}: expected JSON, found unparsable text ({e})") from e
        if not isinstance(data, Mapping) or not isinstance(data.get("shards"), list):
            raise ManifestError(f"{where}: expected an object with 'schema' and 'shards'")
        try:
            schema = DatasetSchema.from_dict(data.get("schema"), f"{where}: schema")  # type: ignore[arg-type]
        except SchemaError as e:
            raise ManifestError(str(e)) from e
        shards = tuple(_shard_info(s, f"{where}: shards[{i}]") for i, s in enumerate(data["shards"]))
        manifest = cls(schema=schema, shards=shards)
        if data.get("num_samples") != manifest.num_samples:
            raise ManifestError(f"{where}: num_samples expected {manifest.num_samples} (sum over "
                                f"shards), found {data.get('num_samples')!r}")
        return manifest


def _shard_info(d: Any, where: str) -> ShardInfo:
    ok = (isinstance(d, Mapping) and isinstance(d.get("name"), str)
          and all(isinstance(d.get(k), int) and d[k] >= 0 for k in ("samples", "bytes"))
          and isinstance(d.get("sha256"), str) and len(d["sha256"]) == 64)
    if not ok:
        raise ManifestError(f"{where}: expected {{name, samples, bytes, sha256}}, found {d!r}")
    return ShardInfo(name=d["name"], samples=d["samples"], bytes=d["bytes"], sha256=d["sha256"])


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read a manifest from a local path or fsspec URL."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return Manifest.from_json(f.read(), where=url)
    except FileNotFoundError as e:
        raise ManifestError(f"{url}: manifest not found") from e
    except PermissionError as e:
        raise ManifestError(f"{url}: access denied ({e}); check the credentials") from e
    except REMOTE_ERRORS as e:
        raise ManifestError(f"{url}: unreachable ({e})") from e
