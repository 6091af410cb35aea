"""Part 4 of ``make bench``: conversion at scale, ours against litdata and MosaicML, 1 and 2 processes.

Two workloads, generated once per run: ImageNet-like JPEG folders (``imagenet100`` source,
JPEG bytes passed through) and a CIFAR-100 python-release source (``cifar100mh`` format).
Every tool writes the same samples in the same shuffled order, once with one process and
once with two. The peers read the JPEG files themselves; for CIFAR they get the unpickled
arrays, while ours is timed as the whole ``convert`` call (unpickling and checks included).
Outputs are counted back before they are deleted.
Run: ``python -m benchmarks.bench_convert_scale [--quick] [--out docs/bench]``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_convert import disk_bytes, verify
from benchmarks.common import DEFAULT_OUT, bar_chart, machine_info, timed, timed_cpu, write_results
from shard_tools.conversion.plan import sample_order
from shard_tools.convert import convert
from shard_tools.formats.cifar100mh.synthetic import generate_cifar100
from shard_tools.formats.imagenet100.class_lists import load_class_list
from shard_tools.formats.imagenet100.synthetic import generate_imagenet100

PACKAGES = ("multihead-shards", "litdata", "mosaicml-streaming", "numpy", "Pillow", "matplotlib")
TOOLS = ("ours", "litdata", "mosaicml_streaming")
PEERS = TOOLS[1:]
PROCESSES = (1, 2)
CHUNK_BYTES = 64 * 1024 * 1024
LITDATA_BLOCK = 100  # samples per litdata input (per-input overhead is large, see part 1)
TARGET_1, TARGET_2 = 1.0, 1.7  # ours / fastest peer at 1 process; ours(2) / fastest peer(1)


@dataclass(frozen=True)
class Workload:
    """One source as every tool sees it: ``samples(i)`` is source sample ``i`` as a peer
    writes it (reading the file for JPEG), ``order`` the shared shuffled write order."""

    name: str
    format_name: str
    src: Path
    touch: Path  # bumping its mtime invalidates ours' in-process cache of the source
    columns: dict[str, str]
    sample: Callable[[int], dict[str, Any]]
    order: list[int]


def _jpeg_sample(paths: Sequence[Path], labels: Sequence[int], i: int) -> dict[str, Any]:
    return {"index": i, "image": paths[i].read_bytes(), "label": labels[i]}


def _cifar_sample(images: np.ndarray, fine: Sequence[int], coarse: Sequence[int], i: int) -> dict[str, Any]:
    return {"index": i, "image": images[i].tobytes(), "fine": fine[i], "coarse": coarse[i]}


def imagenet_workload(src: Path) -> Workload:
    """JPEG paths and labels (position of the class in the CMC list), as our scan orders them."""
    wnids = load_class_list("cmc").wnids
    pairs = [(p, label) for label, w in enumerate(wnids) for p in sorted((src / "train" / w).glob("*.JPEG"))]
    paths, labels = [p for p, _ in pairs], [label for _, label in pairs]
    return Workload("imagenet", "imagenet100", src, src / "train", {"index": "int", "image": "bytes", "label": "int"},
                    partial(_jpeg_sample, paths, labels), sample_order(len(paths), shuffle=True, seed=0))


def cifar_workload(src: Path) -> Workload:
    with open(src / "train", "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # our own synthetic file
    images = np.asarray(batch[b"data"])
    return Workload("cifar", "cifar100mh", src, src / "train",
                    {"index": "int", "image": "bytes", "fine": "int", "coarse": "int"},
                    partial(_cifar_sample, images, batch[b"fine_labels"], batch[b"coarse_labels"]),
                    sample_order(len(images), shuffle=True, seed=0))


# --- the writers: each takes the workload, an empty output dir and a process count ----------

OURS_SHARD_SAMPLES = 1000

def run_ours(w: Workload, out: Path, procs: int) -> None:
    """The whole ``convert`` call, source cache invalidated first (rescan / unpickle); shards
    of 1,000 samples with no byte limit, so that with 2 processes each worker writes whole
    shards (see docs/conversion.md)."""
    st = w.touch.stat()
    os.utime(w.touch, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    convert(w.format_name, w.src, out, splits=["train"], shuffle=True, seed=0, workers=procs,
            max_samples=OURS_SHARD_SAMPLES, max_bytes=None)


def _litdata_block(w: Workload, block: range) -> Iterator[dict[str, Any]]:
    for pos in block:
        yield w.sample(w.order[pos])


def run_litdata(w: Workload, out: Path, procs: int) -> None:
    from litdata import optimize

    for var, sub in (("DATA_OPTIMIZER_CACHE_FOLDER", "chunks"), ("DATA_OPTIMIZER_DATA_CACHE_FOLDER", "data")):
        os.environ[var] = str(out.parent / "litdata-cache" / sub)  # else it creates /tmp/chunks, /tmp/data
    n = len(w.order)
    blocks = [range(a, min(a + LITDATA_BLOCK, n)) for a in range(0, n, LITDATA_BLOCK)]
    optimize(fn=partial(_litdata_block, w), inputs=blocks, output_dir=str(out), num_workers=procs,
             chunk_bytes=CHUNK_BYTES, start_method="fork", reorder_files=False, verbose=False)


def _mds_write(w: Workload, out: Path, positions: range) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns=w.columns, size_limit=CHUNK_BYTES) as writer:
        for pos in positions:
            writer.write(w.sample(w.order[pos]))


def run_mds(w: Workload, out: Path, procs: int) -> None:
    """One writer, or ``procs`` forked processes each writing its contiguous share of the
    write order into ``out/<k>/``, then ``merge_index`` (MosaicML's documented recipe)."""
    n = len(w.order)
    if procs == 1:
        _mds_write(w, out, range(n))
        return
    from streaming.base.util import merge_index

    bounds = [n * k // procs for k in range(procs + 1)]
    parts = [out / str(k) for k in range(procs)]
    ctx = multiprocessing.get_context("fork")
    jobs = [ctx.Process(target=_mds_write, args=(w, part, range(bounds[k], bounds[k + 1])))
            for k, part in enumerate(parts)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
        if job.exitcode != 0:
            raise RuntimeError(f"MDS writer process exited with {job.exitcode}")
    logging.disable(logging.WARNING)  # it warns about its temp dir and the non-empty ``out``
    try:
        merge_index([str(part / "index.json") for part in parts], str(out), keep_local=True)
    finally:
        logging.disable(logging.NOTSET)


RUNNERS: dict[str, Callable[[Workload, Path, int], None]] = {
    "ours": run_ours, "litdata": run_litdata, "mosaicml_streaming": run_mds}


# --- driver ----------------------------------------------------------------------------------

def measure(w: Workload, work: Path, runs: int) -> dict[str, dict[str, Any]]:
    """Every tool at every process count ``runs`` times, interleaved; report the best."""
    times: dict[str, list[tuple[float, float]]] = {}
    sizes: dict[str, int] = {}
    n = len(w.order)
    for run in range(runs):
        for procs in PROCESSES:
            for tool, write in RUNNERS.items():
                key, out = f"{tool}_{procs}p", work / f"{w.name}-{tool}-{procs}p-{run}"
                _, wall, cpu = timed_cpu(partial(write, w, out, procs))
                verify(tool, out, n)
                sizes[key] = disk_bytes(out)
                shutil.rmtree(out)
                shutil.rmtree(work / "litdata-cache", ignore_errors=True)
                times.setdefault(key, []).append((wall, cpu))
                print(f"  {w.name} run {run + 1}/{runs} {key:<22} {wall:6.2f} s wall {cpu:6.2f} s cpu "
                      f"{n / wall:10,.0f} samples/s")
    results = {}
    for key, ts in times.items():
        wall, cpu = min(ts)
        results[key] = {"samples_per_s": n / wall, "best_seconds": wall, "cpu_seconds_of_best": cpu,
                        "seconds": [t for t, _ in ts], "output_bytes": sizes[key]}
    return results


def warm_up(w: Workload, work: Path) -> None:
    """Every tool once per process count on the first 200 samples (imports, first calls)."""
    small = Workload(w.name, w.format_name, w.src, w.touch, w.columns, w.sample, w.order[:200])
    for procs in PROCESSES:
        for tool in PEERS:
            RUNNERS[tool](small, work / f"warmup-{tool}-{procs}", procs)
            verify(tool, work / f"warmup-{tool}-{procs}", 200)
            shutil.rmtree(work / f"warmup-{tool}-{procs}")
    run_ours(w, work / "warmup-ours", 1)  # ours has no sample limit: one full untimed run
    shutil.rmtree(work / "warmup-ours")


def judge(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rate = {k: v["samples_per_s"] for k, v in results.items()}
    best1 = max(PEERS, key=lambda t: rate[f"{t}_1p"])
    best2 = max(PEERS, key=lambda t: rate[f"{t}_2p"])
    r1 = rate["ours_1p"] / rate[f"{best1}_1p"]
    r2 = rate["ours_2p"] / rate[f"{best1}_1p"]
    return {"best_peer_1p": best1, "best_peer_2p": best2, "ratio_1p_vs_best_peer_1p": r1,
            "ratio_2p_vs_best_peer_1p": r2, "ratio_2p_vs_best_peer_2p": rate["ours_2p"] / rate[f"{best2}_2p"],
            "ours_speedup_2p_over_1p": rate["ours_2p"] / rate["ours_1p"],
            # samples per CPU-second against the same peer: ours hashes on a second thread, so its wall time
            # can beat a peer's while it spends more CPU
            "cpu_ratio_1p_vs_best_peer_1p": (results[f"{best1}_1p"]["cpu_seconds_of_best"]
                                             / results["ours_1p"]["cpu_seconds_of_best"]),
            "target_1p_met": r1 >= TARGET_1, "target_2p_met": r2 >= TARGET_2}


LABELS = {"ours": "ours convert", "litdata": "litdata optimize", "mosaicml_streaming": "MDSWriter"}


def chart(summary: dict[str, Any], out_dir: Path) -> Path:
    labels, values, mine = [], [], []
    for name, wl in summary["workloads"].items():
        for procs in PROCESSES:
            for tool in TOOLS:
                label = f"{name}: {LABELS[tool]}, {procs} proc"
                labels.append(label)
                values.append(wl["results"][f"{tool}_{procs}p"]["samples_per_s"])
                if tool == "ours":
                    mine.append(label)
    m = summary["machine"]
    title = (f"Conversion at scale: {summary['workloads']['imagenet']['samples']:,} JPEGs, "
             f"{summary['workloads']['cifar']['samples']:,} CIFAR samples\n"
             f"{m['usable_cpus']} CPUs, Python {m['python']}, best of {summary['runs']}")
    return bar_chart(out_dir / "convert_scale.png", labels, values, title=title,
                     xlabel="samples/s (higher is better)", highlight=mine)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="500 JPEGs, 5,000 CIFAR samples, one run (default: 10,000 and 100,000)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per tool (default 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where convert_scale.json/png go")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 5)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    per_class, n_cifar = (5, 5000) if args.quick else (100, 100_000)
    machine = machine_info(PACKAGES)  # load average before we add our own
    workloads: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-convert-scale-") as tmp:
        work = Path(tmp)
        print(f"generating {100 * per_class:,} JPEGs and {n_cifar:,} CIFAR samples in {work}")
        jpeg_src, gen_jpeg_s = timed(partial(generate_imagenet100, work / "imagenet100", n_train=per_class,
                                             n_val=0, min_size=160, max_size=320, quality=90))
        cifar_src, gen_cifar_s = timed(partial(generate_cifar100, work / "cifar100", n_train=n_cifar, n_test=100))
        cifar, pickle_s = timed(partial(cifar_workload, cifar_src))
        for w, extra in ((imagenet_workload(jpeg_src), {"generate_s": gen_jpeg_s}),
                         (cifar, {"generate_s": gen_cifar_s, "source_pickle_load_s": pickle_s})):
            warm_up(w, work)
            results = measure(w, work, args.runs)
            train = w.src / "train"
            src_bytes = train.stat().st_size if train.is_file() else disk_bytes(train)
            workloads[w.name] = {"samples": len(w.order), "source_bytes": src_bytes, **extra,
                                 "results": results, **judge(results)}
    summary = {"part": "convert_scale", "machine": machine, "runs": args.runs, "quick": args.quick,
               "targets": {"ratio_1p_vs_best_peer_1p": TARGET_1, "ratio_2p_vs_best_peer_1p": TARGET_2},
               "imagenet_image": "RGB JPEG q90, sides 160-320 px, passed through",
               "cifar_image": "32x32x3 uint8 raw (3072 B), heads fine and coarse", "workloads": workloads}
    for name, wl in workloads.items():
        print(f"{name}: ours 1p / {wl['best_peer_1p']} 1p = {wl['ratio_1p_vs_best_peer_1p']:.2f}x "
              f"(target {TARGET_1}: {'met' if wl['target_1p_met'] else 'NOT met'}); ours 2p / same = "
              f"{wl['ratio_2p_vs_best_peer_1p']:.2f}x (target {TARGET_2}: "
              f"{'met' if wl['target_2p_met'] else 'NOT met'})")
    print(f"wrote {write_results(args.out, 'convert_scale', summary)} and {chart(summary, args.out)}")


if __name__ == "__main__":
    main()
