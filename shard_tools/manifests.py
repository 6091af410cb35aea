"""``shards manifest DIR``: write the manifests a shard set lacks. After a multi-node
conversion, merge the nodes' manifests (:func:`~shard_tools.conversion.nodes.merge_manifests`);
otherwise rebuild each split's missing or stale ``manifest.json`` from its shards, after
checking them as ``shards validate`` does. Nothing is written for a split whose shards have
any problem, or where a conversion's staging shows one did not finish."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.errors import ConversionError, PipelineError
from pipeline.format.manifest import MANIFEST_NAME, Manifest
from pipeline.io.reading import read_manifest
from pipeline.io.shard_sets import STAGING_DIR
from shard_tools.conversion.nodes import merge_manifests
from shard_tools.staging import write_atomic
from shard_tools.validate import validate

log = logging.getLogger(__name__)
MAX_LISTED = 10  # problems quoted in the error


def write_manifests(out: str | Path) -> dict[str, tuple[Manifest, str]]:
    """For every split under ``out``: its manifest and what was done (``written`` from node manifests,
    ``rebuilt`` or ``up to date``)."""
    out = Path(out)
    if list(out.glob("*/manifest.node-*-of-*.json")):
        return {split: (manifest, "written") for split, manifest in merge_manifests(out).items()}
    splits = [out] if _tars(out) else [d for d in sorted(out.iterdir()) if d.is_dir() and _tars(d)] \
        if out.is_dir() else []
    if not splits:
        raise ConversionError(f"{out}: no node manifests and no .tar files (directly or in split directories)")
    return {split_dir.name: rebuild_manifest(split_dir) for split_dir in splits}


def _tars(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.tar") if p.is_file())


def rebuild_manifest(split_dir: Path) -> tuple[Manifest, str]:
    """The manifest of a split directory's shards (by name), written if it was missing or
    differs; a ConversionError, and nothing written, when any shard has a problem."""
    if (split_dir / STAGING_DIR).exists():
        raise ConversionError(f"{split_dir}: a conversion's {STAGING_DIR} is there: it did not finish; run it again "
                              "rather than list what it left")
    urls = [str(p) for p in _tars(split_dir)]
    report = validate(urls, progress=False)
    if not report.ok:
        listed = "; ".join(str(p) for p in report.problems[:MAX_LISTED])
        raise ConversionError(f"{split_dir}: {len(report.problems)} problem(s) in its shards, so no manifest was "
                              f"written: {listed}")
    manifest = Manifest(schema=next(iter(report.schemas.values())), shards=tuple(report.found[u] for u in urls))
    path = split_dir / MANIFEST_NAME
    if path.is_file() and _same(path, manifest):
        return manifest, "up to date"
    write_atomic(path, manifest.to_json())
    log.info("%s: manifest written (%d shards, %d samples)", path, len(manifest.shards), manifest.num_samples)
    return manifest, "rebuilt"


def _same(path: Path, manifest: Manifest) -> bool:
    """Whether the manifest at ``path`` is ``manifest`` (an unreadable one is stale)."""
    try:
        return read_manifest(str(path)) == manifest
    except PipelineError as e:
        log.info("%s: %s: rebuilt", path, e)
        return False
