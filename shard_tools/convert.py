"""``convert``: the one entry point of a conversion, and the only place a strategy is chosen.

It configures the source format once, plans every split once (:mod:`.conversion.plan`:
schema, order, resume key), then hands the plans to one strategy: node shares
(:mod:`.conversion.nodes`), planned slices over worker processes (shards limited by
sample count only, :mod:`.conversion.slices`), or one process writing in order
(:mod:`.conversion.sequential`); for an object-store ``OUT`` it converts into a local work
directory and uploads (:mod:`.conversion.remote`). Nothing imports this module but the
command line and users.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConversionError
from pipeline.format.manifest import MANIFEST_NAME, Manifest
from pipeline.io.reading import read_manifest
from shard_tools.conversion.locks import LOCK, conversion_lock
from shard_tools.conversion.nodes import check_node_settings, convert_share
from shard_tools.conversion.plan import Limits, SourceSplit, SplitPlan, plan_split
from shard_tools.conversion.remote import (
    clear_work_directory,
    converted_key,
    is_remote_output,
    mark_converted,
    upload_split,
    work_directory,
)
from shard_tools.conversion.sequential import stage_split
from shard_tools.conversion.slices import stage_split_slices
from shard_tools.formats import SourceFormat, get_format
from shard_tools.writer import DEFAULT_MAX_BYTES, DEFAULT_MAX_SAMPLES, Staged, report_skipped

log = logging.getLogger(__name__)


def convert(format_name: str, src: str | Path, out: str | Path, *,
            splits: Sequence[str] | None = None, shuffle: bool = True, seed: int = 0,
            max_samples: int | None = DEFAULT_MAX_SAMPLES,
            max_bytes: int | None = DEFAULT_MAX_BYTES,
            options: Mapping[str, Any] | None = None, workers: int = 1, num_nodes: int = 1,
            node_rank: int = 0, storage_options: dict[str, Any] | None = None,
            work_dir: str | Path | None = None) -> dict[str, Manifest]:
    """Convert every split (or the named ones) of a source dataset into shards under ``out``.
    ``options`` configure the source format (see each format's options; most take none);
    ``workers`` processes read, check and encode samples, and the shards come out the same
    whatever their number.

    All splits are staged first and published together: a run that fails on any split
    publishes nothing and leaves earlier output as it was. A run that is interrupted
    (Ctrl-C, a killed process) leaves its finished shards staged, and running the same
    conversion again keeps those that are sound and writes only the rest.

    With ``num_nodes`` > 1 this process writes only node ``node_rank``'s share of the
    shards and a node manifest (see :mod:`shard_tools.conversion.nodes`); it returns no manifests.

    ``out`` may be an object-store URL (``s3://bucket/prefix``, with ``storage_options``):
    the shards are made in a local ``work_dir`` (default: one per URL under the user's
    cache directory), then uploaded split by split with each manifest last; an interrupted
    run resumes both (see :mod:`shard_tools.conversion.remote`)."""
    remote = is_remote_output(out)
    _check_settings(out, remote=remote, work_dir=work_dir, workers=workers, num_nodes=num_nodes)
    fmt, src = get_format(format_name, options), Path(src)
    wanted = tuple(dict.fromkeys(splits)) if splits else fmt.splits(src)
    if num_nodes > 1:  # a node's plan is keyed by its node count: the shares resume apart
        node_samples = check_node_settings(num_nodes, node_rank, max_samples, max_bytes)
        node_plans = _plans(fmt, src, wanted, shuffle, seed, (node_samples, num_nodes))
        with _split_locks(Path(out), wanted, node=(node_rank, num_nodes)):
            for plan in node_plans:
                convert_share(plan, Path(out), num_nodes=num_nodes, node_rank=node_rank, max_samples=node_samples,
                              workers=workers)
        return {}
    plans = _plans(fmt, src, wanted, shuffle, seed, (max_samples, max_bytes))
    if remote:
        return _convert_and_upload(plans, str(out), work_dir, storage_options, (max_samples, max_bytes), workers)
    return _convert_locally(plans, Path(out), (max_samples, max_bytes), workers)


def _plans(fmt: SourceFormat, src: Path, splits: Sequence[str], shuffle: bool, seed: int,
           limits: Limits) -> list[SplitPlan]:
    """Every split planned (its input checked) before anything is written."""
    return [plan_split(SourceSplit(fmt, src, split), shuffle=shuffle, seed=seed, limits=limits) for split in splits]


def _check_settings(out: str | Path, *, remote: bool, work_dir: str | Path | None, workers: int,
                    num_nodes: int) -> None:
    if workers < 1:
        raise ConversionError(f"workers: expected >= 1, found {workers}")
    if remote and num_nodes > 1:
        raise ConversionError(f"{out}: multi-node conversion writes to a shared directory, not a URL")
    if not remote and work_dir is not None:
        raise ConversionError(f"work_dir: only used when OUT is a URL; {out} is a local directory")


@contextlib.contextmanager
def _split_locks(out: Path, splits: Sequence[str], node: tuple[int, int] | None = None) -> Iterator[None]:
    """One conversion of a split at a time; node shares together, each share once."""
    with contextlib.ExitStack() as held:
        for split in splits:
            held.enter_context(conversion_lock(out / split, LOCK, shared=node is not None))
            if node is not None:
                held.enter_context(conversion_lock(out / split, f".convert.node-{node[0]}-of-{node[1]}.lock"))
        yield


def _convert_locally(plans: Sequence[SplitPlan], out: Path, limits: Limits, workers: int) -> dict[str, Manifest]:
    with _split_locks(out, [plan.split for plan in plans]):
        manifests = _stage_and_publish(plans, out, limits, workers)
    for plan in plans:
        report_skipped(out / plan.split, len(plan.order), manifests[plan.split].num_samples)
    return manifests


def _stage_and_publish(plans: Sequence[SplitPlan], out: Path, limits: Limits, workers: int) -> dict[str, Manifest]:
    """Stage every split, then publish them all; an error publishes none. Shards limited by
    sample count only are planned slices (any process writes any shard); otherwise one
    process writes in order, starting a shard wherever a limit says."""
    max_samples, max_bytes = limits
    staged: list[Staged] = []
    try:
        for plan in plans:
            if max_bytes is None and max_samples is not None:
                staged.append(stage_split_slices(plan, out, max_samples=max_samples, workers=workers))
            else:
                staged.append(stage_split(plan, out, max_samples=max_samples, max_bytes=max_bytes, workers=workers))
    except Exception:  # an error (not an interrupt): nothing of this run stays staged
        for split in staged:
            split.abort()
        raise
    return {split.schema.split: split.publish() for split in staged}


def _convert_and_upload(plans: Sequence[SplitPlan], out: str, work_dir: str | Path | None,
                        storage_options: dict[str, Any] | None, limits: Limits, workers: int) -> dict[str, Manifest]:
    """Convert into a work directory of this conversion's own (splits converted completely
    by an earlier run are kept), then upload every split, manifest last."""
    work = work_directory(out, [plan.split for plan in plans], work_dir)
    log.info("%s: building the shards in %s before uploading them", out, work)
    with conversion_lock(work):  # a second run of the same conversion fails at once, naming this one
        manifests = {plan.split: read_manifest(str(work / plan.split / MANIFEST_NAME)) for plan in plans
                     if converted_key(work / plan.split) == plan.key}
        if manifests:
            log.info("%s: splits %s were converted completely by an earlier run; kept", work, sorted(manifests))
        todo = [plan for plan in plans if plan.split not in manifests]
        if todo:
            manifests.update(_convert_locally(todo, work, limits, workers))
            for plan in todo:
                mark_converted(work / plan.split, plan.key)
        for plan in plans:
            upload_split(work / plan.split, f"{out.rstrip('/')}/{plan.split}", manifests[plan.split], storage_options)
        clear_work_directory(work)
    return {plan.split: manifests[plan.split] for plan in plans}
