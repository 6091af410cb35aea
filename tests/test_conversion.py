"""Conversion with several worker processes, and resuming an interrupted conversion."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from pipeline.errors import ConversionError
from shard_tools.cli import main
from shard_tools.convert import convert
from shard_tools.formats.imagenet100.synthetic import generate_imagenet100
from shard_tools.writer import ShardWriter


def digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def source(vimh_source) -> Path:
    """900 + 100 samples of 32x32x3: blocks of about 340 samples, shards of 128."""
    return vimh_source("vimh-32x32x3_c", n_train=900, n_test=100)


def test_worker_count_does_not_change_the_shards(tmp_path: Path, source: Path) -> None:
    one = convert("vimh", source, tmp_path / "one", max_samples=128)
    two = convert("vimh", source, tmp_path / "two", max_samples=128, workers=2)
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
    assert len(one["train"].shards) == len(two["train"].shards) == 8


def test_worker_count_does_not_change_jpeg_shards(tmp_path: Path) -> None:
    src = generate_imagenet100(tmp_path / "src", n_train=1, n_val=1)
    assert main(["convert", "imagenet100", str(src), str(tmp_path / "one"), "--max-samples", "30"]) == 0
    assert main(["convert", "imagenet100", str(src), str(tmp_path / "two"), "--max-samples", "30",
                 "--workers", "2"]) == 0
    assert digests(tmp_path / "one") == digests(tmp_path / "two")


def _interrupt_after(monkeypatch, blocks: int) -> None:
    real = ShardWriter.write_block
    calls = {"n": 0}

    def write_block(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > blocks:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write_block", write_block)


def _interrupted(tmp_path: Path, source: Path, monkeypatch, **kwargs) -> Path:
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)  # two blocks of train written: 5 shards finished, 1 open
        with pytest.raises(KeyboardInterrupt):
            convert("vimh", source, out, max_samples=128, **kwargs)
    published = [p for p in out.rglob("*") if p.is_file() and ".staging" not in p.parts]
    assert published == []  # nothing published; finished shards wait in .staging
    return out


def test_resume_writes_only_the_missing_shards(tmp_path: Path, source: Path, monkeypatch) -> None:
    clean = digests(convert("vimh", source, tmp_path / "clean", max_samples=128) and tmp_path / "clean")
    out = _interrupted(tmp_path, source, monkeypatch)
    staged = sorted((out / "train" / ".staging").glob("*.tar"))
    assert staged, "the interrupted run finished some shards"
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in staged}
    convert("vimh", source, out, max_samples=128)
    assert digests(out) == clean
    after = {name: ((out / "train" / name).stat().st_ino, (out / "train" / name).stat().st_mtime_ns)
             for name in stamps}
    assert after == stamps  # the same files, moved into place, not written again
    assert not (out / "train" / ".staging").exists()


def test_unsound_staged_shard_is_written_again(tmp_path: Path, source: Path, monkeypatch, caplog) -> None:
    clean = digests(convert("vimh", source, tmp_path / "clean", max_samples=128) and tmp_path / "clean")
    out = _interrupted(tmp_path, source, monkeypatch)
    first = out / "train" / ".staging" / "train-000000.tar"
    data = bytearray(first.read_bytes())
    data[2000] ^= 0xFF
    first.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        convert("vimh", source, out, max_samples=128)
    assert digests(out) == clean
    assert "train-000000.tar: not as recorded" in caplog.text


def test_other_settings_or_changed_source_start_over(tmp_path: Path, source: Path, monkeypatch) -> None:
    out = _interrupted(tmp_path, source, monkeypatch)
    convert("vimh", source, out, max_samples=128, seed=1)
    assert digests(out) == digests(convert("vimh", source, tmp_path / "seed1", max_samples=128, seed=1)
                                   and tmp_path / "seed1")
    out2 = _interrupted(tmp_path / "again", source, monkeypatch)
    (source / "vimh_dataset_info.json").touch()  # a newer source: staged shards are not reused
    staged = {p.name: p.stat().st_mtime_ns for p in (out2 / "train" / ".staging").glob("*.tar")}
    convert("vimh", source, out2, max_samples=128)
    assert staged and all((out2 / "train" / n).stat().st_mtime_ns != t for n, t in staged.items())


def test_bad_worker_count(tmp_path: Path, source: Path) -> None:
    with pytest.raises(ConversionError, match=r"workers: expected >= 1, found 0"):
        convert("vimh", source, tmp_path / "out", workers=0)


def test_killed_conversion_resumes(tmp_path: Path, vimh_source) -> None:
    """A real SIGKILL in the middle of a split, then the same command again."""
    import signal
    import subprocess
    import sys
    import time

    src = vimh_source("vimh-32x32x3_k", n_train=20000, n_test=16)
    clean = tmp_path / "clean"
    convert("vimh", src, clean, max_samples=500)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "shard_tools.cli", "convert", "vimh", str(src), str(out), "--max-samples", "500"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = out / "train" / ".staging"
    deadline = time.monotonic() + 60
    while not list(staged.glob("train-*.tar")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if not staged.exists():
        pytest.skip("the conversion finished before it could be killed")
    assert not (out / "train" / "manifest.json").exists()
    kept = len(list((out / "train" / ".staging").glob("train-*.tar")))
    assert subprocess.run(command, capture_output=True, check=False).returncode == 0
    assert digests(out) == digests(clean)
    assert kept >= 1


def test_workers_writing_whole_shards_match_one_process(tmp_path: Path, source: Path) -> None:
    """With shards limited by sample count, each worker writes whole shards itself."""
    one = convert("vimh", source, tmp_path / "one", max_samples=100, max_bytes=None)
    two = convert("vimh", source, tmp_path / "two", max_samples=100, max_bytes=None, workers=2)
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
    assert one["train"] == two["train"] and len(two["train"].shards) == 9
    assert not (tmp_path / "two" / "train" / ".staging").exists()


def test_parallel_resume_keeps_every_sound_shard(tmp_path: Path, source: Path) -> None:
    clean = digests(convert("vimh", source, tmp_path / "clean", max_samples=100, max_bytes=None) and tmp_path / "clean")
    out = tmp_path / "out"
    convert("vimh", source, out, max_samples=100, max_bytes=None, workers=2)
    # as if killed: shards 0..8 of train staged and recorded, shard 3 damaged, nothing published
    staging_dir = out / "train" / ".staging"
    staging_dir.mkdir()
    for shard in sorted((out / "train").glob("train-*.tar")):
        shard.rename(staging_dir / shard.name)
    (out / "train" / "manifest.json").unlink()
    from shard_tools.conversion.plan import SourceSplit, plan_split
    from shard_tools.formats import get_format
    from shard_tools.staging import PROGRESS, start_progress

    key = plan_split(SourceSplit(get_format("vimh"), source, "train"), shuffle=True, seed=0, limits=(100, None)).key
    from pipeline.io.reading import read_manifest

    clean_shards = read_manifest(str(tmp_path / "clean" / "train" / "manifest.json")).shards
    start_progress(staging_dir / PROGRESS, key, clean_shards)
    damaged = staging_dir / "train-000003.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1024] + bytes(1024) + b"x")
    stamps = {p.name: p.stat().st_mtime_ns for p in staging_dir.glob("*.tar") if p.name != damaged.name}
    convert("vimh", source, out, max_samples=100, max_bytes=None, workers=2)
    assert digests(out) == clean
    assert {n: (out / "train" / n).stat().st_mtime_ns for n in stamps} == stamps


def test_progress_record_ignores_a_line_cut_short(tmp_path: Path, caplog) -> None:
    """A kill in the middle of appending a shard's line loses that shard only."""
    from pipeline.format.manifest import ShardInfo
    from shard_tools.staging import append_progress, read_progress, start_progress

    path = tmp_path / "progress.jsonl"
    first, second = ShardInfo("a.tar", 1, 10, "0" * 64), ShardInfo("b.tar", 2, 20, "1" * 64)
    start_progress(path, "key", [first])
    append_progress(path, second)
    assert read_progress(path, "key") == [first, second] and read_progress(path, "other key") == []
    path.write_text(path.read_text()[:-9])
    with caplog.at_level(logging.WARNING):
        assert read_progress(path, "key") == [first]
    assert "ignoring a line cut short" in caplog.text


def test_a_second_conversion_of_the_same_split_fails_at_once(tmp_path: Path, source: Path) -> None:
    """Two runs writing one split would mix their staging: the second fails, naming the
    first; a lock left by a killed run (a file nobody holds) is taken over."""
    import os

    from shard_tools.conversion.locks import LOCK, conversion_lock

    out = tmp_path / "out"
    with conversion_lock(out / "train"):
        with pytest.raises(ConversionError, match=rf"train/\.convert\.lock: another conversion \(process "
                                                  rf"{os.getpid()} or its worker processes\) is writing .*train; "
                                                  r"wait for it to finish"):
            convert("vimh", source, out, max_samples=128)
        assert not list(out.rglob("*.tar"))
    assert not out.exists() or not list(out.rglob("*"))  # released: lock file and empty directories gone
    (out / "train").mkdir(parents=True)
    (out / "train" / LOCK).write_text("12345")  # as a SIGKILL leaves it
    manifests = convert("vimh", source, out, max_samples=128)
    assert manifests["train"].num_samples == 900 and not list(out.rglob(LOCK))


def test_node_shares_run_together_but_never_beside_a_one_machine_run(tmp_path: Path, source: Path) -> None:
    """Node shares of a split hold its lock shared (and their own share's exclusively); a
    one-machine run holds it exclusively, and would delete the shares' shards."""
    from shard_tools.conversion.locks import LOCK, conversion_lock

    out, nodes = tmp_path / "out", {"max_samples": 100, "max_bytes": None, "num_nodes": 2}
    with conversion_lock(out / "train", ".convert.node-1-of-2.lock"):
        convert("vimh", source, out, node_rank=0, **nodes)  # another share runs
        with pytest.raises(ConversionError, match=r"node-1-of-2\.lock: another conversion \(process \d+ or its worker"):
            convert("vimh", source, out, node_rank=1, **nodes)
    with conversion_lock(out / "train", LOCK, shared=True):  # a share of node 1 is running
        with pytest.raises(ConversionError, match=r"convert\.lock: another conversion \(node shares of this split\)"):
            convert("vimh", source, out, max_samples=100, max_bytes=None)
        convert("vimh", source, out, node_rank=1, **nodes)
    with conversion_lock(out / "train"), pytest.raises(ConversionError, match=r"convert\.lock: another conversion "
                                                                              r"\(process \d+ or its worker"):
        convert("vimh", source, out, node_rank=0, **nodes)
    assert not list(out.rglob("*.lock"))


def test_a_lock_file_replaced_by_another_run_is_not_removed(tmp_path: Path) -> None:
    from shard_tools.conversion.locks import LOCK, conversion_lock

    with conversion_lock(tmp_path / "d"):
        (tmp_path / "d" / LOCK).unlink()  # as a run that removed it and one that made it again would
        (tmp_path / "d" / LOCK).write_text("someone else")
    assert (tmp_path / "d" / LOCK).read_text() == "someone else"


def test_a_file_system_without_locks_converts_with_a_warning(tmp_path: Path, source: Path, monkeypatch,
                                                             caplog) -> None:
    import errno

    import shard_tools.conversion.locks as locks

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        manifests = convert("vimh", source, tmp_path / "out", splits=["train", "train"], max_samples=128)
    assert manifests["train"].num_samples == 900 and list(manifests) == ["train"]  # a split named twice: once
    assert "the file system has no locks (" in caplog.text and "would not be stopped" in caplog.text


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_is_reported_block_by_block(tmp_path: Path, source: Path, monkeypatch, workers: int) -> None:
    """The bar moves as blocks are written (in a pool: through a shared counter the parent
    polls), not once per job, and ends at the split's size."""
    import shard_tools.conversion.slices as parallel

    updates: list[int] = []

    class Recorder:
        def __init__(self, *args, total: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
            self.total = total

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
            pass

        def update(self, n: int) -> None:
            updates.append(n)

    monkeypatch.setattr(parallel, "ProgressBar", Recorder)
    monkeypatch.setattr(parallel, "POLL_S", 0.001)
    convert("vimh", source, tmp_path / "out", splits=["train"], max_samples=100, max_bytes=None, workers=workers)
    jobs = -(-9 // max(1, min(parallel.MAX_RUN, 9 // (4 * workers))))
    assert sum(updates) == 900
    assert len([n for n in updates if n]) > (jobs if workers == 1 else 1)
