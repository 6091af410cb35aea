"""Side measurements of the loader benchmark: expected epoch content, the JPEG decode limit,
ours over S3 (a moto server on 127.0.0.1), and a cProfile of ours with ``num_workers=0``."""

from __future__ import annotations

import contextlib
import cProfile
import hashlib
import io
import os
import pstats
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import decode_jpeg

from benchmarks.workloads import Workload

BATCH = 256
STRIDE = 4  # content checks sum every 4th pixel of every 4th row (all channels)



def time_epoch(loader: Any) -> tuple[float, int]:
    """Seconds for one full pass over ``loader`` and the samples it yielded."""
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        count += images.shape[0]
    return time.perf_counter() - start, count


def time_epochs(loader: Any, epochs: int, expected: int, what: str) -> list[float]:
    """Seconds of each of ``epochs`` full passes; every pass must yield ``expected`` samples."""
    times = []
    for epoch in range(epochs):
        seconds, count = time_epoch(loader)
        if count != expected:
            raise RuntimeError(f"{what}: {count} samples in epoch {epoch + 1}, expected {expected}")
        times.append(seconds)
    return times


def _tensors(w: Workload) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in w.images]


def expected_checksums(w: Workload) -> dict[str, Any]:
    """What one epoch must contain: sample count, per-head label sums, the sum of a fixed
    subset of pixels (every ``STRIDE``-th row and column) and the sum of (that pixel sum x
    first head's label), which ties images to their labels."""
    if w.encoding == "raw":
        pixels = np.frombuffer(b"".join(w.images), np.uint8).reshape(w.n, *w.shape)
        per_image = pixels[:, :, ::STRIDE, ::STRIDE].reshape(w.n, -1).sum(1, dtype=np.int64)
    else:
        per_image = np.array([int(decode_jpeg(t)[:, ::STRIDE, ::STRIDE].sum(dtype=torch.int64))
                              for t in _tensors(w)], np.int64)
    first = w.labels[w.heads[0]]
    return {"samples": w.n, "label_sums": {h: int(c.sum()) for h, c in w.labels.items()},
            "pixel_sum": int(per_image.sum()), "pixel_label_sum": int((per_image * first).sum())}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rate(fn: Any, items: list[Any], passes: int = 2) -> float:
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def _decode_all(images: list[bytes], passes: int, batch: int, ready: Any, report: Any) -> None:
    import simplejpeg

    slots = None
    if batch:
        h, w, _, _ = simplejpeg.decode_jpeg_header(images[0])
        slots = np.zeros((batch, h, w, 3), np.uint8)
    ready.wait()
    start = time.perf_counter()
    for _ in range(passes):
        for i, data in enumerate(images):
            if slots is None:
                simplejpeg.decode_jpeg(data, colorspace="RGB")
            else:
                simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=slots[i % batch])
    report.send(time.perf_counter() - start)


def concurrent_decode_rate(images: list[bytes], processes: int, passes: int = 3, tries: int = 3,
                           batch: int = 0) -> float:
    """Images/s when ``processes`` forked processes each decode every image ``passes`` times
    with ``simplejpeg`` at once: what the cores give together (shared caches, memory and, on
    a VM, whatever else the host runs), the best of ``tries``. The processes start decoding
    together (a barrier) and each times its own loop, so forking and exiting are not counted;
    the slowest process's time is the pass's. With ``batch``, each image is decoded into its
    slot of a ``batch``-image array (fixed-size images only), as a batch must hold them;
    otherwise into memory the decoder allocates (and reuses, cache-warm)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    best = 0.0
    for _ in range(tries):
        ready = context.Barrier(processes)
        pipes = [context.Pipe(duplex=False) for _ in range(processes)]
        procs = [context.Process(target=_decode_all, args=(images, passes, batch, ready, sender))
                 for _, sender in pipes]
        for proc in procs:
            proc.start()
        seconds = max(receiver.recv() for receiver, _ in pipes)
        for proc in procs:
            proc.join()
        best = max(best, processes * passes * len(images) / seconds)
    return best


def decode_limit(w: Workload, workers: int) -> dict[str, Any]:
    """The machine's JPEG decode limit on this workload's images: decode only, no batching.
    Single-core rates (best of 2 passes) of torchvision, simplejpeg and Pillow, and the rate of
    ``workers`` processes decoding with simplejpeg at the same time, which is the limit
    (one core's rate times ``workers`` is also given; two processes do not reach it here)."""
    import simplejpeg
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    tensors = _tensors(w)
    sample = w.images[: min(500, w.n)]
    with torch_threads(1):
        tv = _rate(decode_jpeg, tensors)
        sj = _rate(lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"), w.images)
        tv_image = _rate(lambda t: decode_image(t, mode=ImageReadMode.RGB), tensors[: len(sample)])
        pil = _rate(lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), sample)
    together = concurrent_decode_rate(w.images[:2000], workers)
    print(f"  JPEG decode, one core: torchvision {tv:,.0f}/s, simplejpeg {sj:,.0f}/s, Pillow {pil:,.0f}/s; "
          f"{workers} processes at once: {together:,.0f}/s", flush=True)
    return {"torchvision_decode_jpeg_per_core": tv, "simplejpeg_per_core": sj,
            "torchvision_decode_image_per_core": tv_image, "pillow_per_core": pil, "workers": workers,
            "one_core_times_workers": max(tv, sj) * workers, "limit_samples_per_s": together}


# --- S3 -------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MOTO = ("import sys, time\nfrom moto.server import ThreadedMotoServer\n"
        "ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False).start()\n"
        "time.sleep(10**9)\n")


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in a child process (so it does not share the loader's GIL)."""
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_EC2_METADATA_DISABLED": "true"}
    proc = subprocess.Popen([sys.executable, "-c", MOTO, str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("moto server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_throughput(w: Workload, work: Path, local_rate: float, *, epochs: int) -> dict[str, Any]:
    """Ours reading ``w``'s shards from moto S3: a warm-up epoch, then ``epochs`` timed ones."""
    import s3fs

    from benchmarks.peers import ours

    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    with moto_server() as url:
        options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": url}}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench")
        start = time.perf_counter()
        fs.put(str(w.ours / "train") + "/", "bench/raw32/train/", recursive=True)
        upload = time.perf_counter() - start
        loader = ours(w, batch_size=BATCH, workers=2, source="s3://bench/raw32/train", storage_options=options)
        times = time_epochs(loader, epochs + 1, w.n, "ours from S3")
        for epoch, seconds in enumerate(times):
            print(f"  {w.name} ours from S3 epoch {epoch + 1}: {seconds:6.2f} s {w.n / seconds:10,.0f} "
                  f"samples/s", flush=True)
    rate = w.n / statistics.median(times[1:])
    return {"samples_per_s": rate, "first_epoch_s": times[0], "timed_epochs_s": times[1:], "upload_s": upload,
            "fraction_of_local": rate / local_rate, "local_samples_per_s": local_rate,
            "server": "moto ThreadedMotoServer in a child process on 127.0.0.1"}


# --- profile ----------------------------------------------------------------------------------------

def _name(file: str, line: int, func: str) -> str:
    return func if file == "~" else f"{Path(file).parent.name}/{Path(file).name}:{line}({func})"


def _per_sample(stats: pstats.Stats, n: int, column: int, keep: Any, limit: int) -> list[tuple[str, float]]:
    """``(function, µs/sample)`` of column 2 (own time) or 3 (cumulative), largest first."""
    rows = [(_name(*key), v[column]) for key, v in stats.stats.items() if keep(key)]  # type: ignore[attr-defined]
    rows.sort(key=lambda r: -r[1])
    return [(name, t / n * 1e6) for name, t in rows[:limit]]


def profile_ours(w: Workload) -> dict[str, Any]:
    """Ours in the main process (``num_workers=0``): one warm-up epoch, one plain timed epoch,
    one under cProfile. Reports µs/sample: cumulative time of every function in ``pipeline/``
    (they nest) and the functions with the most own time (builtins included)."""
    from benchmarks.peers import ours

    loader = ours(w, batch_size=BATCH, workers=0)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        for _batch in loader:
            pass
        times.append(time.perf_counter() - start)
    profiler = cProfile.Profile()
    profiler.enable()
    for _batch in loader:
        pass
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    ours_code = _per_sample(stats, w.n, 3, lambda k: "/pipeline/" in k[0] and k[2] != "<listcomp>", 14)
    own_time = _per_sample(stats, w.n, 2, lambda k: True, 14)
    print(f"  profile {w.name}: in-process {w.n / times[1]:,.0f} samples/s "
          f"({times[1] / w.n * 1e6:.1f} µs/sample)", flush=True)
    return {"num_workers": 0, "samples_per_s": w.n / times[1], "us_per_sample": times[1] / w.n * 1e6,
            "profiled_us_per_sample": total / w.n * 1e6, "pipeline_cumulative_us_per_sample": ours_code,
            "top_own_time_us_per_sample": own_time}


# --- the DataLoader floor -------------------------------------------------------------------------

class _Blank(torch.utils.data.IterableDataset):
    """One uint8 buffer per batch holding the batch's pixels and int64 labels, written once
    into fresh shared memory: the least any loader must do to hand a batch over."""

    def __init__(self, w: Workload, workers: int) -> None:
        self.sample_bytes = int(np.prod(w.shape)) + 8 * len(w.heads)
        self.n, self.workers = w.n, workers

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        for start in range(worker * BATCH, self.n, self.workers * BATCH):
            size = min(BATCH, self.n - start)
            yield torch.empty(size * self.sample_bytes, dtype=torch.uint8).share_memory_()


def dataloader_floor(w: Workload, workers: int, epochs: int = 3) -> dict[str, Any]:
    """The DataLoader machinery alone, set up as ours is (persistent workers, one buffer per
    batch): no reading, no decoding. No tool that hands batches over from ``workers``
    processes can beat this rate here."""
    loader = torch.utils.data.DataLoader(_Blank(w, workers), batch_size=None, num_workers=workers,
                                         persistent_workers=True)
    times = []
    for _ in range(epochs + 1):
        start, count = time.perf_counter(), 0
        for buffer in loader:
            count += len(buffer) // (int(np.prod(w.shape)) + 8 * len(w.heads))
        times.append(time.perf_counter() - start)
    if count != w.n:
        raise RuntimeError(f"DataLoader floor: {count} samples, expected {w.n}")
    del loader
    rate = w.n / statistics.median(times[1:])
    print(f"  {w.name} DataLoader floor (blank batches, {workers} workers): {rate:,.0f} samples/s", flush=True)
    return {"samples_per_s": rate, "timed_epochs_s": times[1:], "first_epoch_s": times[0]}


def in_process(w: Workload, tools: tuple[str, ...] = ("ours", "seeds"), epochs: int = 3) -> dict[str, Any]:
    """The same epochs with ``num_workers=0`` (everything in the main process): a side note,
    not a ranked result. Only tools that need no peer copy."""
    from benchmarks.peers import build

    out = {}
    for tool in tools:
        loader = build(tool, w, {}, batch_size=BATCH, workers=0)
        times = time_epochs(loader, epochs + 1, w.n, f"{tool} in process")
        out[tool] = {"samples_per_s": w.n / statistics.median(times[1:]), "timed_epochs_s": times[1:]}
        print(f"  {w.name} {tool} with num_workers=0: {out[tool]['samples_per_s']:,.0f} samples/s", flush=True)
    return out


REPO = Path(__file__).resolve().parents[1]


def pipeline_state(root: Path = REPO) -> dict[str, Any]:
    """Which ``pipeline/`` was measured: git HEAD, its uncommitted files, a digest of its sources."""
    files = sorted((root / "pipeline").glob("*.py"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
        except OSError:
            return ""
        return done.stdout.strip()

    return {"git_head": git("rev-parse", "--short", "HEAD"), "sources_sha256_16": digest,
            "uncommitted": git("status", "--porcelain", "--", "pipeline").splitlines()}
