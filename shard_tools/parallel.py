"""Parallel conversion where every worker writes whole shards.

When shards are limited by sample count only, shard ``i`` of a split is samples
``order[i*S:(i+1)*S]`` whoever writes it, so ``N`` worker processes can each write whole
shards (read, encode, hash, write) and the result is byte-identical to one process. The
parent only records progress (for resume, any sound shard is kept) and publishes the
split, manifest last.
"""

from __future__ import annotations

import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.manifest import Manifest, ShardInfo
from pipeline.schema import DatasetSchema
from shard_tools import staging
from shard_tools.convert import Source, prepare_blocks, split_plan, staging_source
from shard_tools.writer import STAGING_DIR, ShardWriter, publish_staged


@dataclass
class StagedSplit:
    """A split whose shards wait in staging; ``publish`` or ``abort`` it."""

    out_dir: Path
    schema: DatasetSchema
    shards: list[ShardInfo]

    @property
    def staging_dir(self) -> Path:
        return self.out_dir / STAGING_DIR

    def publish(self) -> Manifest:
        return publish_staged(self.out_dir, self.staging_dir, self.schema, self.shards)

    def abort(self) -> None:
        shutil.rmtree(self.staging_dir, ignore_errors=True)


def _write_shard(source: Source, schema: DatasetSchema, index: int, samples: list[int], out_dir: Path) -> ShardInfo:
    """Shard ``index`` of ``samples``, built in ``out_dir/.worker-<index>`` and moved into ``out_dir``."""
    writer = ShardWriter(out_dir, schema, max_samples=len(samples), max_bytes=None, publish_on_exit=False,
                         first_index=index, staging_dir=f".worker-{index}")
    with writer:
        for keys, members, columns, _ in prepare_blocks(source, schema, samples):
            writer.write_block(keys, members, columns)
    return writer.move_shards()[0]


def write_shard_job(job: tuple[Source, DatasetSchema, int, list[int], Path]) -> ShardInfo:
    """Write shard ``index`` (the given samples) into ``out_dir``; one job of a worker pool."""
    return _write_shard(*job)


def stage_split_parallel(source: Source, out: Path, *, shuffle: bool, seed: int, max_samples: int,
                         workers: int) -> StagedSplit:
    """Write a split's shards with ``workers`` processes, each shard whole by one of them."""
    schema, order = split_plan(source, shuffle=shuffle, seed=seed)
    key = staging.resume_key(schema, order, staging_source(source), (max_samples, None))
    staged = StagedSplit(out / source.split, schema, [])
    staged.staging_dir.mkdir(parents=True, exist_ok=True)
    done = {s.name: s for s in staging.resume(staged.staging_dir, key, prefix=False)}
    names = [f"{source.split}-{i:06d}.tar" for i in range(-(-len(order) // max_samples))]
    todo = [(source, schema, i, order[i * max_samples:(i + 1) * max_samples], staged.staging_dir)
            for i, name in enumerate(names) if name not in done]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for info in pool.imap_unordered(write_shard_job, todo):
            done[info.name] = info  # recorded as each shard lands, so a kill loses only shards in flight
            staging.append_progress(staged.staging_dir / staging.PROGRESS, info)
    staged.shards = [done[name] for name in names]
    return staged
