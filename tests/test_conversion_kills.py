"""Conversions killed with SIGKILL at every step of publishing and at random moments of
writing: nothing left behind may look valid, and the same command run again gives output
byte-identical to a run that was never killed."""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import make_loader
from pipeline.errors import ManifestError, PipelineError
from shard_tools.convert import convert
from shard_tools.validate import validate

# Run in a subprocess: convert, and SIGKILL this process at the Nth file operation
# (rename or unlink) once publishing has begun.
KILLED_WHILE_PUBLISHING = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import shard_tools.conversion.slices, shard_tools.writer
    from shard_tools.convert import convert

    src, out, kill_at, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    steps, publishing = [0], [False]
    real_replace, real_unlink, real_publish = os.replace, Path.unlink, shard_tools.writer.publish_staged

    def step():
        if publishing[0]:
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    def replace(*args, **kwargs):
        step()
        return real_replace(*args, **kwargs)

    def unlink(self, *args, **kwargs):
        step()
        return real_unlink(self, *args, **kwargs)

    def publish(*args, **kwargs):
        publishing[0] = True
        return real_publish(*args, **kwargs)

    os.replace, Path.unlink = replace, unlink
    shard_tools.writer.publish_staged = shard_tools.conversion.slices.publish_staged = publish
    convert("vimh", src, out, max_samples=8, seed=seed, max_bytes=None if len(sys.argv) > 5 else 256 << 20)
    print("steps", steps[0])
""")


def digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and ".lock" not in p.name}


def published(out: Path, split: str) -> dict[str, str]:
    return {k: v for k, v in digests(out).items() if k.startswith(f"{split}/") and "/." not in k}


def state_is_sound(out: Path, before: dict[str, str], after: dict[str, str]) -> None:
    """Each split is either exactly the old output, exactly the new one, or refused by the
    loader and the validator (no manifest)."""
    for split in ("train", "test"):
        now = published(out, split)
        whole = [{k: v for k, v in d.items() if k.startswith(f"{split}/")} for d in (before, after)]
        if (out / split / "manifest.json").exists():
            assert now in whole, f"{split}: a manifest over shards that are neither the old nor the new output"
            assert validate(str(out / split), progress=False).ok
        elif list((out / split).glob("*.tar")) or (out / split / ".staging").exists():
            with pytest.raises(ManifestError, match=r"no manifest.json"):
                make_loader(str(out), split=split, batch_size=4, num_workers=0)
            assert not validate(str(out / split), progress=False).ok
        else:  # nothing there but perhaps a killed run's lock file
            with pytest.raises(PipelineError, match=r"no such file or directory|no split"):
                make_loader(str(out), split=split, batch_size=4, num_workers=0)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", KILLED_WHILE_PUBLISHING, *args], capture_output=True, text=True,
                          check=False, timeout=120)


@pytest.mark.parametrize("slices", [False, True], ids=["sequential", "planned-slices"])
def test_a_kill_at_every_step_of_publishing_over_an_earlier_output(tmp_path: Path, vimh_source,
                                                                    slices: bool) -> None:
    src = vimh_source("vimh-4x4x1_p", n_train=24, n_test=8)
    extra = ("slices",) if slices else ()
    out, clean = tmp_path / "out", tmp_path / "clean"
    convert("vimh", src, out, max_samples=8, seed=0)
    convert("vimh", src, clean, max_samples=8, seed=1, max_bytes=None if slices else 256 << 20)
    before, after = digests(out), digests(clean)
    shutil.copytree(out, tmp_path / "count")
    total = int(run(str(src), str(tmp_path / "count"), "0", "1", *extra).stdout.split()[-1])
    assert total >= 8  # two splits: manifest out, stale shards out, shards in, manifest in
    for kill_at in range(1, total + 1):
        killed = run(str(src), str(out), str(kill_at), "1", *extra)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        state_is_sound(out, before, after)
        assert run(str(src), str(out), "0", "1", *extra).returncode == 0  # the same command again
        assert digests(out) == after, f"killed at step {kill_at}: the re-run differs from a clean run"
        convert("vimh", src, out, max_samples=8, seed=0)  # the earlier output again, for the next kill
        assert digests(out) == before


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_kills_at_random_moments_never_leave_a_valid_looking_split(tmp_path: Path, vimh_source, workers: int) -> None:
    """10 kills at random moments of a conversion (1 and 2 worker processes), each followed
    by a check of what is left and the same command again."""
    src = vimh_source("vimh-16x16x3_r", n_train=6000, n_test=400)
    clean = tmp_path / "clean"
    convert("vimh", src, clean, max_samples=200, max_bytes=None, workers=workers)
    expected = digests(clean)
    command = [sys.executable, "-m", "shard_tools.cli", "convert", "vimh", str(src), str(tmp_path / "out"),
               "--max-samples", "200", "--max-bytes", "0", "--workers", str(workers)]
    durations = []
    for seed in range(10):
        out = tmp_path / "out"
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(random.Random(seed).uniform(0.3, 2.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        durations.append(time.monotonic() - started)
        time.sleep(0.2)  # worker processes die with their parent
        state_is_sound(out, {}, expected)
        assert subprocess.run(command, capture_output=True, check=False, timeout=300).returncode == 0
        assert {k: v for k, v in digests(out).items() if "/." not in k} == expected
        shutil.rmtree(out)
    assert max(durations) < 10
