"""Memory over a long run: a loader with persistent workers, hundreds of short epochs.

Resident memory of the training process and of the loader's worker processes (read from
/proc) must stay flat once warmed up: anything kept per epoch (decoded shards, shared-memory
hand-off buffers, plans, indexes, file handles) would grow it epoch after epoch, and a
long training run would end killed by the OOM killer, or its workers would.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import make_loader
from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh

EPOCHS, WARM = 300, 100  # the allocator settles over the first ~100 epochs (about 6 MB in the workers), then stays
N_TRAIN, PER_SHARD, BATCH = 256, 64, 16  # 4 shards of 64 32x32x3 images (196 kB each), 16 batches an epoch
MB = 1 << 20
# Allowed growth from epoch WARM to epoch EPOCHS, for the main process (which also runs
# pytest) and for the two workers together. Keeping one decoded shard (196 kB) or one
# hand-off buffer (8 batches, 393 kB) per epoch would add 39 to 78 MB over the 200 epochs.
MAIN_MARGIN, WORKERS_MARGIN = 4 * MB, 4 * MB
FD_MARGIN = 4  # open file descriptors of the main process (queue pipes come and go)


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children() -> set[int]:
    me, found = str(os.getpid()), set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] not in "ZX":
                found.add(int(name))
    return found


@dataclass
class Usage:
    main: int
    workers: int
    fds: int

    def __str__(self) -> str:
        return f"main {self.main / MB:.1f} MB, workers {self.workers / MB:.1f} MB, {self.fds} fds"


def usage(workers: set[int]) -> Usage:
    gc.collect()
    return Usage(rss(os.getpid()), sum(rss(pid) for pid in workers), len(os.listdir("/proc/self/fd")))


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("memory")
    src = generate_vimh(root / "src" / "vimh-32x32x3_mem", n_train=N_TRAIN, n_test=16, height=32, width=32,
                        channels=3)
    convert("vimh", src, root / "shards", max_samples=PER_SHARD)
    return root / "shards"


def run(shard_root: Path, batches_per_pass: int | None) -> None:
    """EPOCHS passes over one loader (all of each epoch, or only its first batches); checks
    the samples of every full epoch and the memory at epoch WARM against the last."""
    before = children()
    loader = make_loader(str(shard_root), batch_size=BATCH, num_workers=2, seed=1, shuffle_buffer=64,
                         with_keys=True)
    workers: set[int] = set()
    history: list[tuple[int, Usage]] = []
    for epoch in range(1, EPOCHS + 1):
        keys = []
        for number, (_, _, batch_keys) in enumerate(loader):
            keys += batch_keys
            if number + 1 == batches_per_pass:
                break
        expected = N_TRAIN if batches_per_pass is None else batches_per_pass * BATCH
        assert len(keys) == len(set(keys)) == expected, epoch
        if epoch == 1:
            workers = children() - before
            assert len(workers) == 2, f"expected the loader's 2 worker processes, found {workers}"
        if epoch in (WARM, EPOCHS) or epoch % 50 == 0:
            history.append((epoch, usage(workers)))
    assert children() - before == workers, "the persistent workers were replaced during the run"
    warm, last = history[0][1], history[-1][1]
    trace = "; ".join(f"epoch {e}: {u}" for e, u in history)
    assert last.main - warm.main < MAIN_MARGIN, f"the main process grew: {trace}"
    assert last.workers - warm.workers < WORKERS_MARGIN, f"the workers grew: {trace}"
    assert last.fds - warm.fds <= FD_MARGIN, f"file descriptors leak: {trace}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_memory_stays_flat_over_many_epochs_with_persistent_workers(shard_root: Path) -> None:
    run(shard_root, batches_per_pass=None)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_memory_stays_flat_over_many_interrupted_epochs(shard_root: Path) -> None:
    """Passes left after 3 of 16 batches (a trainer's limit_train_batches, an exception, a
    break): the batches the workers had prepared ahead are dropped every time."""
    run(shard_root, batches_per_pass=3)
