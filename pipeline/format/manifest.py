"""Per-split manifest: the schema plus the name, sample count, size and sha256 of each shard."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ManifestError, SchemaError, quoted
from pipeline.format.bounded_json import load_json
from pipeline.format.schema import DatasetSchema
from pipeline.format.tar_read import BLOCK

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # about half a million shards
MIN_SAMPLE_BYTES = 2 * BLOCK  # a sample is at least two members (image, labels), a header block each
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}\.tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
        """A manifest checked in structure and types: every shard named once by a plain file
        name, counts that are integers (not booleans) and fit the shard's bytes, and
        ``num_samples`` their sum."""
        data = load_json(text, where=where, error=ManifestError, max_bytes=MAX_MANIFEST_BYTES)
        if not isinstance(data, Mapping) or not isinstance(data.get("shards"), list):
            raise ManifestError(f"{where}: expected an object with 'schema' and 'shards' (a list)")
        try:
            schema = DatasetSchema.from_dict(data.get("schema"), f"{where}: schema")  # type: ignore[arg-type]
        except SchemaError as e:
            raise ManifestError(str(e)) from e
        shards = tuple(_shard_info(s, f"{where}: shards[{i}]") for i, s in enumerate(data["shards"]))
        names: dict[str, int] = {}
        for i, shard in enumerate(shards):
            if shard.name in names:
                raise ManifestError(f"{where}: shards[{i}]: {shard.name!r} is listed again (first as "
                                    f"shards[{names[shard.name]}]); each shard must be listed once")
            names[shard.name] = i
        manifest = cls(schema=schema, shards=shards)
        num_samples = data.get("num_samples")
        if not _is_count(num_samples) or num_samples != manifest.num_samples:
            raise ManifestError(f"{where}: num_samples expected {manifest.num_samples} (sum over "
                                f"shards), found {quoted(num_samples)}")
        return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shard_info(d: Any, where: str) -> ShardInfo:
    """One ``shards`` entry: a plain ``.tar`` file name (no path, no NUL, not hidden), counts
    as non-negative integers with at most one sample per ``MIN_SAMPLE_BYTES`` bytes, and a
    sha256 in hex."""
    expected = "{name, samples, bytes, sha256}"
    if not isinstance(d, Mapping) or not {"name", "samples", "bytes", "sha256"} <= set(d):
        raise ManifestError(f"{where}: expected {expected}, found {quoted(d)}")
    name, samples, size, sha = d["name"], d["samples"], d["bytes"], d["sha256"]
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
        raise ManifestError(f"{where}: name: expected a plain file name <name>.tar (letters, digits, _ . -; not "
                            f"hidden, no path), found {quoted(name)}")
    if not _is_count(samples) or not _is_count(size):
        raise ManifestError(f"{where}: samples and bytes: expected integers >= 0, found {quoted(samples)} and "
                            f"{quoted(size)}")
    if samples > size // MIN_SAMPLE_BYTES:
        raise ManifestError(f"{where}: {name}: {samples} samples cannot fit in {size} bytes (a sample takes at "
                            f"least {MIN_SAMPLE_BYTES})")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ManifestError(f"{where}: sha256: expected 64 hex digits, found {quoted(sha)}")
    return ShardInfo(name=name, samples=samples, bytes=size, sha256=sha)
