"""Processes that die: a DataLoader worker, the process that owns the workers, a training run.

Every scenario runs in a subprocess (of this test process) so that the kills cannot disturb
the test run; processes are found and checked through /proc, by pid *and* start time (a
recycled pid is not taken for the old process). Only processes these tests started are
signalled, by pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, PER_SHARD = 640, 16  # 40 shards; batches of 8: 80 batches, 10 hand-offs of 8 batches


# -- /proc helpers -------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1], start time [19])."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of the live children of ``pid``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields and fields[1] == str(pid) and fields[0] not in "ZX":
                found.append((int(name), fields[19]))
    return sorted(found)


def alive(procs: list[tuple[int, str]]) -> list[int]:
    """The pids of ``procs`` still running (not gone, not a zombie, not a recycled pid)."""
    live = []
    for pid, started in procs:
        fields = _stat(pid)
        if fields and fields[19] == started and fields[0] not in "ZX":
            live.append(pid)
    return live


def wait_gone(procs: list[tuple[int, str]], limit: float) -> tuple[list[int], float]:
    """Waits up to ``limit`` s for ``procs`` to end; returns (those still alive, seconds waited)."""
    start = time.monotonic()
    while alive(procs) and time.monotonic() - start < limit:
        time.sleep(0.02)
    return alive(procs), time.monotonic() - start


def kill_leftovers(procs: list[tuple[int, str]]) -> None:
    for pid in alive(procs):
        os.kill(pid, signal.SIGKILL)


def python(script: str, *args: str, **kwargs: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)  # type: ignore[call-overload]


def read_event(proc: subprocess.Popen, limit: float) -> dict:
    """The next JSON line the script prints (other lines are skipped), within ``limit`` s."""
    import selectors

    deadline = time.monotonic() + limit
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"the script ended (rc {proc.wait()}): {proc.stderr.read()[-3000:]}")
            if line.startswith("{"):
                return json.loads(line)
    raise AssertionError(f"no event from the script within {limit} s")


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults-processes")
    src = generate_vimh(root / "src" / "vimh-16x16x3_procs", n_train=N_TRAIN, n_test=16, height=16, width=16,
                        channels=3, seed=5)
    convert("vimh", src, root / "shards", max_samples=PER_SHARD)
    return root / "shards"


PROC_HELPERS = """
import gc, json, os, sys, time

def event(**fields):
    print(json.dumps(fields), flush=True)

def children():
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == str(os.getpid()) and fields[0] not in "ZX":
                found.append((int(name), fields[19]))
    return sorted(found)

def alive(procs):
    live = []
    for pid, started in procs:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == started and fields[0] not in "ZX":
            live.append(pid)
    return live
"""


# -- a DataLoader worker killed mid-epoch ------------------------------------------------------------
KILLED_WORKER = PROC_HELPERS + """
from pipeline import make_loader

class Slow:  # a slow transform: the epoch takes a while
    def __call__(self, image):
        time.sleep(0.002)
        return image

loader = make_loader(sys.argv[1], batch_size=8, num_workers=2, shuffle_buffer=16, with_keys=True, transform=Slow())
workers = []
try:
    batches = iter(loader)
    next(batches)
    workers = children()
    event(kind="workers", workers=workers)
    sys.stdin.readline()  # meanwhile the test kills a worker
    count = 1 + sum(1 for _ in batches)
    event(kind="end", batches=count)
except Exception as e:
    event(kind="error", type=type(e).__name__, module=type(e).__module__,
          mro=[c.__name__ for c in type(e).__mro__], message=str(e)[:3000])
start = time.monotonic()
while alive(workers) and time.monotonic() - start < 3:
    time.sleep(0.02)
event(kind="after-error", alive=alive(workers), waited=time.monotonic() - start)
start = time.monotonic()
try:  # the same loader again: an epoch, or an error at once; never a hang
    count = sum(1 for _ in loader)
    event(kind="second-pass", batches=count, elapsed=time.monotonic() - start)
except Exception as e:
    event(kind="second-pass", error=type(e).__name__, message=str(e)[:500], elapsed=time.monotonic() - start)
del batches, loader
gc.collect()
event(kind="released", alive=alive(workers + children()))
"""
KILL_DETECTED_BOUND = 10.0  # torch notices by SIGCHLD at once, or at its 5 s status check


@pytest.fixture(scope="module")
def killed_worker(shard_root: Path) -> dict:
    """Runs the scenario once: a loader with 2 workers, one SIGKILLed after the first batch."""
    proc = python(KILLED_WORKER, str(shard_root))
    workers: list = []
    try:
        started = read_event(proc, 60)
        assert started["kind"] == "workers", started
        workers = [tuple(w) for w in started["workers"]]
        assert len(workers) == 2, f"expected the loader's 2 worker processes, found {workers}"
        victim = workers[0]
        os.kill(victim[0], signal.SIGKILL)
        killed_at = time.monotonic()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        failure = read_event(proc, 30)
        detected = time.monotonic() - killed_at
        events = {"workers": workers, "victim": victim, "failure": failure, "detected": detected}
        for _ in range(3):
            event = read_event(proc, 60)
            events[event["kind"]] = event
        proc.wait(30)
        events["returncode"] = proc.returncode
        events["alive_after_exit"], _ = wait_gone(workers, 5)
        return events
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_leftovers(workers)


@pytest.mark.timeout(120)
def test_killed_worker_fails_the_epoch_loudly_and_promptly(killed_worker: dict) -> None:
    failure = killed_worker["failure"]
    assert failure["kind"] == "error", f"the epoch went on without one of its workers: {failure}"
    assert "PipelineError" in failure["mro"], failure  # torch's RuntimeError, as a project error
    victim = killed_worker["victim"][0]
    assert "DataLoader worker (pid" in failure["message"] and str(victim) in failure["message"], failure
    assert killed_worker["detected"] < KILL_DETECTED_BOUND
    second = killed_worker["second-pass"]  # the failed pass stopped its workers: the next one starts new ones
    assert second.get("batches") == 80, second
    assert killed_worker["released"]["alive"] == [], "workers outlived their loader"
    assert killed_worker["returncode"] == 0
    assert killed_worker["alive_after_exit"] == []


@pytest.mark.timeout(120)
def test_killed_worker_leaves_no_worker_running(killed_worker: dict) -> None:
    """After the failed epoch, with the loader object still referenced (a trainer's datamodule
    keeps it), the loader's other worker must not live on: the epoch is over and a worker
    of it is dead. (persistent_workers keeps it, idle, until the loader is dropped.)"""
    after = killed_worker["after-error"]
    assert after["alive"] == [], f"worker(s) {after['alive']} still running {after['waited']:.1f} s after the error"


# -- the process that owns the workers is killed -------------------------------------------------------
ORPHANS = PROC_HELPERS + """
from pipeline import make_loader

class Stall:
    '''Fast for a worker's first `fast` samples, then 60 s per sample (a read or decode that hangs).'''
    def __init__(self, fast):
        self.fast, self.seen = fast, 0
    def __call__(self, image):
        self.seen += 1
        if self.seen > self.fast:
            time.sleep(60)
        return image

busy = sys.argv[2] == "busy"
loader = make_loader(sys.argv[1], batch_size=8, num_workers=2, shuffle_buffer=16,
                     transform=Stall(64 if busy else 10**9))
for number, _ in enumerate(loader):
    if number == 0:
        event(kind="workers", workers=children())
    if not busy:
        time.sleep(1)  # a slow consumer: the workers wait for it
"""
# Idle workers (blocked handing over to a slow consumer) notice a dead parent at torch's 5 s
# status check; busy ones (a long read or decode) only when that ends, here after a minute,
# unless they die with their parent (PR_SET_PDEATHSIG), which takes milliseconds.
ORPHAN_BOUND = {"idle": 8.0, "busy": 3.0}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers_are", ["idle", "busy"])
def test_no_orphan_workers_after_the_parent_is_killed(shard_root: Path, workers_are: str) -> None:
    proc = python(ORPHANS, str(shard_root), workers_are)
    workers: list = []
    try:
        started = read_event(proc, 60)
        workers = [tuple(w) for w in started["workers"]]
        assert len(workers) == 2, f"expected the loader's 2 worker processes, found {workers}"
        time.sleep(0.5)  # the workers are now waiting (idle) or in their stalled transform (busy)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        left, waited = wait_gone(workers, ORPHAN_BOUND[workers_are] + 2)
        assert not left and waited < ORPHAN_BOUND[workers_are], (
            f"{workers_are} workers {left or [w for w, _ in workers]} outlived their killed parent by "
            f"{waited:.1f} s (bound {ORPHAN_BOUND[workers_are]} s)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_leftovers(workers)


# -- a training run SIGKILLed mid-epoch, resumed from its last step checkpoint --------------------------
STEPS_PER_CKPT, BATCH = 5, 4
KILL_AFTER = 7  # trained steps seen in the record: mid-epoch, 2 steps after the step-5 checkpoint


def train_command(root: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.train", "experiment=vimh_demo", f"data.train={root}",
            f"data.batch_size={BATCH}", "data.num_workers=2", "+data.with_keys=true", "trainer.max_epochs=1",
            "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "test=false", "logger=csv",
            "callbacks.model_checkpoint=null", f"paths.root_dir={run}", f"paths.log_dir={run / 'logs'}",
            f"hydra.run.dir={run / 'hydra'}",
            "+callbacks.step_ckpt._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            f"+callbacks.step_ckpt.dirpath={run / 'ckpt'}",
            f"+callbacks.step_ckpt.every_n_train_steps={STEPS_PER_CKPT}", "+callbacks.step_ckpt.save_top_k=-1",
            "+callbacks.keys._target_=tests.key_recorder.KeyRecorder", *extra]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if '"keys"' in line]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_killed_mid_epoch_resumes_with_each_sample_once(tmp_path: Path) -> None:
    from tests.fakes import vimh_shards

    root = vimh_shards(tmp_path / "data")  # 64 train samples: 16 steps of 4
    epoch_keys = Counter()
    from pipeline import make_loader

    for _, _, keys in make_loader(str(root), batch_size=16, num_workers=0, shuffle=False, with_keys=True):
        epoch_keys.update(keys)
    assert sum(epoch_keys.values()) == len(epoch_keys) == 64
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    first_log, second_log = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    run = tmp_path / "run"
    command = train_command(root, run, f"+callbacks.keys.path={first_log}", "+callbacks.keys.delay=0.25")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers: list = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and first.poll() is None:
            if first_log.exists() and len(records(first_log)) >= KILL_AFTER:
                break
            workers = children(first.pid) or workers
            time.sleep(0.02)
        assert first.poll() is None, f"the first run ended early: {first.stdout.read()[-3000:]}"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    trained = records(first_log)
    steps = [r["global_step"] for r in trained]
    assert steps == list(range(1, len(steps) + 1)) and all(r["epoch"] == 0 for r in trained)
    assert KILL_AFTER <= len(steps) < 2 * STEPS_PER_CKPT < 16, f"not killed mid-epoch between checkpoints: {steps}"
    checkpoints = {int(p.stem.rsplit("step=", 1)[1]): p for p in (run / "ckpt").glob("*step=*.ckpt")}
    assert sorted(checkpoints) == [STEPS_PER_CKPT], sorted(checkpoints)
    resume = checkpoints[STEPS_PER_CKPT]

    second = subprocess.run(train_command(root, run, f"+callbacks.keys.path={second_log}",
                                          f"ckpt_path='{resume}'"),
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = records(second_log)
    assert all(r["epoch"] == 0 for r in resumed)
    before = [k for r in trained[:STEPS_PER_CKPT] for k in r["keys"]]
    after = [k for r in resumed for k in r["keys"]]
    assert Counter(before + after) == epoch_keys, (
        f"missing {sorted(epoch_keys - Counter(before + after))}, twice {sorted(Counter(before + after) - epoch_keys)}")
    # the batches trained after the checkpoint and lost with the process are done again, the same
    redone = [r["keys"] for r in trained[STEPS_PER_CKPT:]]
    assert [r["keys"] for r in resumed[:len(redone)]] == redone
    assert [r["global_step"] for r in resumed] == list(range(STEPS_PER_CKPT + 1, 17))
    wait_gone(workers, 8)  # the killed run's DataLoader workers (see the orphan test)
    kill_leftovers(workers)
