"""Part 2 of ``make bench``: loader read throughput, ours against four peers, same data.

Two workloads (``benchmarks.workloads``): 32x32x3 raw VIMH-like samples and 256x256 JPEGs.
Every tool (``benchmarks.peers``) yields uint8 ``[256, C, H, W]`` batches plus int64 labels,
shuffled, from two DataLoader workers. Tools run in interleaved rounds: round 0 is every
tool's warm-up (first) epoch, with content checks; each later round times one full epoch of
every tool, DataLoader worker start-up included. Also: ours reading from a local moto S3
server, the machine's JPEG decode limit, and a cProfile of ours with ``num_workers=0``.
Run: ``python -m benchmarks.bench_loader [--quick] [--out docs/bench]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks import loader_report, peers
from benchmarks.common import DEFAULT_OUT, machine_info, timed, write_results
from benchmarks.loader_extras import (
    STRIDE,
    dataloader_floor,
    decode_limit,
    expected_checksums,
    in_process,
    pipeline_state,
    profile_ours,
    s3_throughput,
)
from benchmarks.workloads import Workload, check_ours, make_jpeg256, make_raw32, write_litdata, write_mds

PACKAGES = ("multihead-shards", "torch", "torchvision", "webdataset", "litdata", "mosaicml-streaming",
            "numpy", "msgpack", "pillow", "moto", "s3fs", "matplotlib")
BATCH = 256
WORKERS = 2


def run_epoch(loader: Iterable[peers.Batch], w: Workload, *, check: bool) -> dict[str, Any]:
    """One full epoch: wall time, samples, label sums, and (``check``) pixel checksums."""
    count, label_sums, pixels, paired = 0, dict.fromkeys(w.heads, 0), 0, 0
    start = time.perf_counter()
    for images, labels in loader:
        count += images.shape[0]
        for head in w.heads:
            label_sums[head] += int(labels[head].sum())
        if check:
            if images.dtype != torch.uint8 or tuple(images.shape[1:]) != w.shape:
                raise RuntimeError(f"expected uint8 [B, {w.shape}], found {images.dtype} {tuple(images.shape)}")
            per_image = images[:, :, ::STRIDE, ::STRIDE].reshape(images.shape[0], -1).sum(1, dtype=torch.int64)
            pixels += int(per_image.sum())
            paired += int((per_image * labels[w.heads[0]]).sum())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": count, "label_sums": label_sums, "pixel_sum": pixels,
            "pixel_label_sum": paired}


def verify(tool: str, epoch: dict[str, Any], expected: dict[str, Any], *, check: bool) -> None:
    """Exactly the epoch's samples (count, per-head label sums; pixels in the checked epoch)."""
    keys = ("samples", "label_sums", *(("pixel_sum", "pixel_label_sum") if check else ()))
    wrong = {k: (epoch[k], expected[k]) for k in keys if epoch[k] != expected[k]}
    if wrong:
        raise RuntimeError(f"{tool}: epoch content differs from the source (found, expected): {wrong}")


def measure_workload(w: Workload, copies: dict[str, Path], expected: dict[str, Any],
                     rounds: int) -> tuple[dict[str, dict[str, Any]], list[float]]:
    """Every tool's epochs in interleaved rounds (order rotated each round); round 0 is the
    checked warm-up. Returns per-tool results and the 1-minute load average after each round."""
    loaders, setup = {}, {}
    for tool in peers.TOOLS:
        loaders[tool], setup[tool] = timed(partial(peers.build, tool, w, copies, batch_size=BATCH,
                                                   workers=WORKERS))
    epochs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in peers.TOOLS}
    load: list[float] = []
    for r in range(rounds + 1):
        order = [*peers.TOOLS[r % len(peers.TOOLS):], *peers.TOOLS[:r % len(peers.TOOLS)]]  # rotate per round
        for tool in order:
            loader = loaders[tool]
            epoch = run_epoch(loader, w, check=r == 0)
            verify(tool, epoch, expected, check=r == 0)
            epochs[tool].append(epoch)
            print(f"  {w.name} {'warm-up' if r == 0 else f'round {r}'} {tool:<33} {epoch['seconds']:6.2f} s "
                  f"{w.n / epoch['seconds']:10,.0f} samples/s", flush=True)
        load.append(os.getloadavg()[0])
    for loader in loaders.values():
        getattr(loader, "close", lambda: None)()
    del loaders  # shuts persistent workers down
    gc.collect()
    results = {tool: summarize_tool(runs, w.n, setup[tool]) for tool, runs in epochs.items()}
    return results, load


def summarize_tool(runs: list[dict[str, Any]], n: int, setup_s: float) -> dict[str, Any]:
    timed_s = [r["seconds"] for r in runs[1:]]
    median = statistics.median(timed_s)
    return {"samples_per_s": n / median, "median_epoch_s": median, "timed_epochs_s": timed_s,
            "second_epoch_s": timed_s[0], "second_epoch_samples_per_s": n / timed_s[0],
            "first_epoch_s": runs[0]["seconds"], "first_epoch_samples_per_s": n / runs[0]["seconds"],
            "setup_s": setup_s, "samples_per_epoch": runs[0]["samples"]}


def run_workload(w: Workload, work: Path, rounds: int) -> dict[str, Any]:
    check_ours(w)
    copies = {"litdata": write_litdata(w, work / f"{w.name}-litdata"),
              "mosaicml_streaming": write_mds(w, work / f"{w.name}-mds")}
    expected = expected_checksums(w)
    results, load = measure_workload(w, copies, expected, rounds)
    best_peer = max(peers.PEERS, key=lambda t: results[t]["samples_per_s"])
    streaming = [t for t in peers.PEERS if not t.startswith("seeds")]
    best_streaming = max(streaming, key=lambda t: results[t]["samples_per_s"])
    ours = results["ours"]["samples_per_s"]
    return {"name": w.name, "title": w.title, "samples": w.n, "shape_chw": list(w.shape),
            "encoding": w.encoding, "mean_image_bytes": sum(map(len, w.images)) / w.n,
            "our_shards": len(list((w.ours / "train").glob("*.tar"))), "results": results,
            "best_peer": best_peer, "ratio_vs_best_peer": ours / results[best_peer]["samples_per_s"],
            "best_streaming_peer": best_streaming,
            "ratio_vs_best_streaming_peer": ours / results[best_streaming]["samples_per_s"],
            "dataloader_floor": dataloader_floor(w, WORKERS), "load_average_1m_after_rounds": load}


def _quiet_foreign_loaders(info: Any, default: Any = sys.unraisablehook) -> None:
    """Forked workers inherit other loaders' live (persistent) DataLoader iterators; when such a
    copy is collected in the child, torch's ``__del__`` asserts 'can only test a child process'.
    Harmless; keep it off the console (the hook is inherited by the workers)."""
    if isinstance(info.exc_value, AssertionError) and "child process" in str(info.exc_value):
        return
    default(info)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12,000 raw + 1,000 JPEG samples, 2 rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where loader.json/png/_section.md go")
    parser.add_argument("--no-s3", action="store_true", help="skip the moto S3 measurement")
    parser.add_argument("--report-only", action="store_true", help="redo the chart and section from loader.json")
    args = parser.parse_args(argv)
    args.raw_n, args.jpeg_n = (12_000, 1_000) if args.quick else (60_000, 4_000)
    args.rounds = 2 if args.quick else 3
    return args


@contextlib.contextmanager
def _temp_inside(work: Path) -> Iterator[None]:
    """Point ``tempfile`` into the work directory, so the lock files MDS leaves in the temp dir
    and multiprocessing's scratch directories are removed with it."""
    before = tempfile.tempdir
    (work / "tmp").mkdir()
    tempfile.tempdir = str(work / "tmp")
    try:
        yield
    finally:
        tempfile.tempdir = before


def measure(args: argparse.Namespace) -> dict[str, Any]:
    machine = machine_info(PACKAGES)  # load average before we add our own
    torch.set_num_threads(1)  # the main loop only counts; avoid OpenMP spinning against the 2 workers
    sys.unraisablehook = _quiet_foreign_loaders
    started = time.perf_counter()
    summary: dict[str, Any] = {"part": "loader", "machine": machine, "quick": args.quick, "batch_size": BATCH,
                               "num_workers": WORKERS, "timed_rounds": args.rounds, "workloads": {},
                               "pipeline_state": pipeline_state()}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp, _temp_inside(Path(tmp)):
        work = Path(tmp)
        print(f"workload 1: {args.raw_n:,} raw 32x32x3 samples in {work}", flush=True)
        raw = make_raw32(work, args.raw_n)
        summary["workloads"]["raw32"] = run_workload(raw, work, args.rounds)
        if not args.no_s3:
            local = summary["workloads"]["raw32"]["results"]["ours"]["samples_per_s"]
            summary["s3"] = s3_throughput(raw, work, local, epochs=min(args.rounds, 3))
        summary["profile"] = {"raw32": profile_ours(raw)}
        summary["in_process"] = {"raw32": in_process(raw)}
        del raw
        print(f"workload 2: {args.jpeg_n:,} JPEG 256x256 samples", flush=True)
        jpeg = make_jpeg256(work, args.jpeg_n)
        summary["decode_limit"] = decode_limit(jpeg, WORKERS)
        summary["workloads"]["jpeg256"] = run_workload(jpeg, work, args.rounds)
        summary["profile"]["jpeg256"] = profile_ours(jpeg)
    summary["targets"] = {"raw32": 2.5, "jpeg256": 1.5}
    summary["total_seconds"] = time.perf_counter() - started
    if pipeline_state()["sources_sha256_16"] != summary["pipeline_state"]["sources_sha256_16"]:
        summary["pipeline_state"]["changed_during_run"] = True
        print("warning: pipeline/ changed during the run; its numbers may mix two versions")
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_only:
        summary = json.loads((args.out / "loader.json").read_text())
    else:
        summary = measure(args)
        write_results(args.out, "loader", summary)
    for name in loader_report.ORDER:
        wl = summary["workloads"][name]
        print(f"{name}: ours / best peer ({wl['best_peer']}) = {wl['ratio_vs_best_peer']:.2f}x "
              f"(target {summary['targets'][name]}x); vs best streaming peer ({wl['best_streaming_peer']}) "
              f"= {wl['ratio_vs_best_streaming_peer']:.2f}x")
    png = loader_report.chart(summary, args.out / "loader.png")
    md = loader_report.write_section(summary, args.out / "loader_section.md")
    print(f"wrote {args.out / 'loader.json'}, {png}, {md}; measured in {summary['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
