"""One process writing a split in order (the strategy when shards are limited by bytes):
blocks are prepared by this process or a pool of workers, in order, and written by one
:class:`~shard_tools.writer.ShardWriter`, which starts a new shard whenever a limit says so.
A resumed run keeps the sound shards of an interrupted one and goes on after the last
sample they hold."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.format.shard_index import index_shard
from shard_tools.conversion.blocks import parallel_blocks, prepare_blocks
from shard_tools.conversion.plan import SplitPlan
from shard_tools.progress_bar import ProgressBar
from shard_tools.writer import ShardWriter


def stage_split(plan: SplitPlan, out: Path, *, max_samples: int | None, max_bytes: int | None,
                workers: int = 1) -> ShardWriter:
    """Write one split into staging under ``out/<split>/`` (keeping the sound shards of an
    interrupted run of the same conversion); publish it later."""
    writer = ShardWriter(out / plan.split, plan.schema, max_samples=max_samples, max_bytes=max_bytes,
                         publish_on_exit=False, resume_key=plan.key)
    order = plan.order
    with writer, ProgressBar(total=len(order), desc=f"{plan.schema.name}/{plan.split}", unit="sample",
                             disable=None, leave=False) as bar:
        remaining = order[resume_position(writer, order):]
        bar.update(len(order) - len(remaining))
        blocks = (parallel_blocks(plan, remaining, workers) if workers > 1
                  else prepare_blocks(plan.source, plan.schema, remaining))
        for keys, members, columns, count in blocks:
            writer.write_block(keys, members, columns)
            bar.update(count)
    return writer


def resume_position(writer: ShardWriter, order: Sequence[int]) -> int:
    """How much of ``order`` the shards kept from an interrupted run cover: up to the last
    sample of the last one (found by its key, the source index: samples a format skipped
    make this more than the samples kept)."""
    if not writer.shards:
        return 0
    path = writer.staging_dir / writer.shards[-1].name
    last = int(index_shard(path.read_bytes(), str(path)).keys[-1])
    return order.index(last) + 1
