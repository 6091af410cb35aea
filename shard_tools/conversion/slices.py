"""Conversion by planned slices: shard ``i`` of a split is samples ``order[i*S:(i+1)*S]``.

When shards are limited by sample count only, every shard's samples are known before
anything is read, so any process can write any shard, and the result is byte-identical
whoever writes it: one process, ``N`` worker processes, or nodes of a cluster
(:mod:`shard_tools.conversion.nodes`). A sample the source format skips (a bad file) leaves its
shard one shorter; a slice with no sample left gives no shard (its number is unused, and
the progress log records it as empty, so a resume does not read it again).

Work goes out as runs of consecutive shards, each run written by one :class:`ShardWriter`
in shared mode, straight into the split's staging directory, each finished shard recorded
in the progress log by the process that wrote it, so a kill loses only shards in flight.
The parent publishes the split, manifest last. One process hashes and writes on a thread
that keeps going across shard boundaries (a second core's worth of work); worker processes
hash in their own thread, since they already fill the cores.
"""

from __future__ import annotations

import functools
import multiprocessing
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

from pipeline.errors import ConversionError
from pipeline.format.manifest import Manifest, ShardInfo
from pipeline.format.schema import DatasetSchema
from pipeline.lifetime import DieWithParent
from shard_tools import staging
from shard_tools.conversion.blocks import prepare_blocks
from shard_tools.conversion.plan import SourceSplit, SplitPlan, planned
from shard_tools.progress_bar import ProgressBar
from shard_tools.writer import STAGING_DIR, ShardWriter, publish_staged, shard_name

MAX_RUN = 16  # shards per job at most: finer jobs balance the workers' loads
POLL_S = 0.2  # how often the parent of a pool updates the progress bar


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


@dataclass(frozen=True)
class SliceJob:
    """Shards ``indices`` (consecutive slices of the order) of a split, written into
    ``directory`` with finished shards recorded in ``progress``."""

    source: SourceSplit
    schema: DatasetSchema
    slices: tuple[tuple[int, Sequence[int]], ...]  # (shard number, its samples)
    max_samples: int
    directory: Path
    progress: Path

    @property
    def planned(self) -> int:
        """Samples planned for the job's shards (those a format skips included)."""
        return sum(len(samples) for _, samples in self.slices)


_report: Callable[[int], None] | None = None  # a pool worker's progress counter (set by its initializer)


def _report_to(counter: Synchronized[int], parent: DieWithParent) -> None:
    """Pool initializer: die with the parent; report progress into a counter it reads."""
    global _report
    parent()

    def add(samples: int) -> None:
        with counter.get_lock():
            counter.value += samples

    _report = add


def write_slices(job: SliceJob, report: Callable[[int], None] | None = None,
                 write_behind: bool = True) -> tuple[int, list[ShardInfo]]:
    """Write a job's shards (one job of a worker pool, or all of them in one process);
    its planned sample count and the shards written. Progress goes to ``report`` (in a pool
    worker: the counter its initializer set) block by block. ``write_behind``: hash and
    write on a thread, for the only writing process (pool workers already fill the cores)."""
    report = report or _report
    writer = ShardWriter(job.directory, job.schema, max_samples=job.max_samples, max_bytes=None,
                         publish_on_exit=False, staging_dir=".", shared=True, progress=job.progress,
                         first_index=job.slices[0][0], write_behind=write_behind)
    with writer:
        for index, samples in job.slices:
            writer.next_shard(index)
            written = 0
            for keys, members, columns, covered in prepare_blocks(job.source, job.schema, samples):
                writer.write_block(keys, members, columns)
                written += len(keys)
                if report is not None:
                    report(covered)
            if not written:  # every sample skipped: recorded, so that a resume does not read them again
                staging.append_progress(job.progress, staging.empty_slice(shard_name(job.schema.split, index)))
    return job.planned, writer.shards


def slice_jobs(plan: SplitPlan, shards: Sequence[int], *, max_samples: int, directory: Path, progress: Path,
               workers: int) -> list[SliceJob]:
    """``shards`` (numbers, increasing) of a split as jobs of up to :data:`MAX_RUN` shards,
    about four jobs per worker."""
    size = max(1, min(MAX_RUN, len(shards) // (4 * workers)))
    runs = [shards[start:start + size] for start in range(0, len(shards), size)]
    return [SliceJob(plan.source, plan.schema, tuple((i, planned(plan.order, i, max_samples)) for i in run),
                     max_samples, directory, progress) for run in runs]


def run_jobs(jobs: Sequence[SliceJob], workers: int,
             on_samples: Callable[[int], None] | None = None) -> Iterator[tuple[int, list[ShardInfo]]]:
    """:func:`write_slices` of each job as it finishes: in this process, or in a pool of
    forked workers. ``on_samples(n)`` hears of every block written, as it is written (from
    a pool: polled from a shared counter while the parent waits)."""
    if workers == 1 or len(jobs) <= 1:
        yield from (write_slices(job, on_samples) for job in jobs)
        return
    context = multiprocessing.get_context("fork")
    counter, shown = context.Value("q", 0), 0
    with context.Pool(min(workers, len(jobs)), initializer=_report_to,
                      initargs=(counter, DieWithParent())) as pool:
        results = pool.imap_unordered(functools.partial(write_slices, write_behind=False), jobs)
        while True:
            try:
                result = results.next(timeout=POLL_S)
            except multiprocessing.TimeoutError:
                result = None
            except StopIteration:
                break
            reported = counter.value  # read once: workers may add to it meanwhile
            if on_samples is not None and reported > shown:
                on_samples(reported - shown)
                shown = reported
            if result is not None:
                yield result


def stage_split_slices(plan: SplitPlan, out: Path, *, max_samples: int, workers: int) -> StagedSplit:
    """Write a split's shards as planned slices with ``workers`` processes (see the module)."""
    staged = StagedSplit(out / plan.split, plan.schema, [])
    staged.staging_dir.mkdir(parents=True, exist_ok=True)
    done = {s.name: s for s in staging.resume(staged.staging_dir, plan.key, prefix=False)}
    names = [shard_name(plan.split, i) for i in range(-(-len(plan.order) // max_samples))]
    todo = [i for i, name in enumerate(names) if name not in done]
    jobs = slice_jobs(plan, todo, max_samples=max_samples, directory=staged.staging_dir,
                      progress=staged.staging_dir / staging.PROGRESS, workers=workers)
    try:
        with ProgressBar(total=len(plan.order), desc=f"{plan.schema.name}/{plan.split}", unit="sample",
                         disable=None, leave=False) as bar:
            bar.update(len(plan.order) - sum(job.planned for job in jobs))
            for _, shards in run_jobs(jobs, workers, bar.update):
                done.update((s.name, s) for s in shards)
    except Exception:  # an error: nothing of this run stays (an interrupt keeps sound shards for a resume)
        staged.abort()
        raise
    staged.shards = [done[name] for name in names if name in done and done[name].samples]
    if not staged.shards:
        raise ConversionError(f"{staged.out_dir}: no samples were written for split {plan.split!r}")
    return staged
