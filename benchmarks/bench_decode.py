"""Part 2b of ``make bench``: JPEG decoded at the size training needs, ours against the peers.

Two sets of photo-like JPEGs (``benchmarks.photos``): 256x256, and ImageNet-like sides of
160-500 px. Each is read as training reads it: ``RandomResizedCrop`` to 224, 112 and 64 (with
a horizontal flip), and ``Resize`` to 32x32. Ours passes ``decode=DecodeSpec(...)`` to
``make_loader`` (the crop is placed in the JPEG's header coordinates and decoded at the
smallest DCT scale that keeps the output size, see ``docs/loader.md``); webdataset, litdata
and MosaicML streaming each run their documented pattern with the best decoder we found,
``torchvision.io.decode_jpeg``, then torchvision v2 transforms with ``antialias=True``. All
tools: same images in shards of their own format, batches of 256, two DataLoader workers kept
across epochs, shuffled. Round 0 is every tool's warm-up epoch (sample count and label sums
checked, and the batch shape); later rounds each time one epoch per tool, order rotated.
Also: ours at full size (no resize) against the machine's decode limit, and the mean PSNR of
our images against the reference pipeline on the same crop boxes.
Run: ``python -m benchmarks.bench_decode [--quick] [--out docs/bench]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import decode_quality, peers
from benchmarks.common import DEFAULT_OUT, machine_info, write_results
from benchmarks.decode_report import write_section
from benchmarks.loader_extras import concurrent_decode_rate, decode_limit
from benchmarks.workloads import Workload, make_jpeg, repeated_jpeg, write_litdata, write_mds
from pipeline.loading.decode_spec import DecodeSpec

PACKAGES = ("multihead-shards", "torch", "torchvision", "webdataset", "litdata", "mosaicml-streaming",
            "numpy", "pillow", "simplejpeg", "opencv-python-headless")
BATCH = 256
WORKERS = 2
SETTINGS: tuple[tuple[str, int | None], ...] = (("random", 224), ("random", 112), ("random", 64), ("resize", 32),
                                                ("full", None))
TOOLS = ("ours", "webdataset", "litdata", "mosaicml_streaming")
TARGET = 1.5  # ours over the best peer at every training size
FULL_TARGET = 0.85  # ours at full size over the decode limit
LONG_EPOCH = 4  # the full-size epoch against the limit: every image this many times


def spec_of(crop: str, size: int | None) -> DecodeSpec | None:
    return None if size is None else DecodeSpec(size, crop=crop, flip=crop == "random")  # type: ignore[arg-type]


def peer_image(transform: Any, data: bytes) -> torch.Tensor:
    image = peers.decode_jpg(data)
    return image if transform is None else transform(image)


def peer_transform(spec: DecodeSpec | None) -> Any:
    """torchvision v2 with antialias, the same geometry as ``spec`` (None: full size)."""
    from torchvision.transforms import v2

    if spec is None:
        return None
    if spec.crop == "random":
        return v2.Compose([v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True),
                           v2.RandomHorizontalFlip()])
    return v2.Resize((spec.size, spec.size), antialias=True)


def build(tool: str, w: Workload, copies: dict[str, Path], spec: DecodeSpec | None) -> Iterable[peers.Batch]:
    if tool == "ours":
        from pipeline.loading.make_loader import make_loader

        return make_loader(str(w.ours), batch_size=BATCH, num_workers=WORKERS, seed=0, decode=spec)
    kw: dict[str, Any] = {"batch_size": BATCH, "workers": WORKERS, "persistent": True,
                          "image": partial(peer_image, peer_transform(spec))}
    if tool == "webdataset":
        return peers.webdataset(w, **kw)
    if tool == "litdata":
        return peers.litdata(w, copies["litdata"], **kw)
    return peers.mosaicml_streaming(w, copies["mosaicml_streaming"], **kw)


def run_epoch(loader: Iterable[peers.Batch], shape: tuple[int, ...] | None, check: bool) -> dict[str, Any]:
    count, label_sum = 0, 0
    start = time.perf_counter()
    for images, labels in loader:
        count += images.shape[0]
        label_sum += int(labels["label"].sum())
        if check and (images.dtype != torch.uint8 or (shape and tuple(images.shape[1:]) != shape)):
            raise RuntimeError(f"expected uint8 [B, {shape}], found {images.dtype} {tuple(images.shape)}")
    return {"seconds": time.perf_counter() - start, "samples": count, "label_sum": label_sum}


def measure_setting(w: Workload, copies: dict[str, Path], crop: str, size: int | None,
                    rounds: int) -> dict[str, Any]:
    spec = spec_of(crop, size)
    shape = (3, size, size) if size else (w.shape if w.shape[1] else None)
    loaders = {tool: build(tool, w, copies, spec) for tool in TOOLS}
    expected = {"samples": w.n, "label_sum": int(w.labels["label"].sum())}
    times: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    for r in range(rounds + 1):
        for tool in [*TOOLS[r % len(TOOLS):], *TOOLS[:r % len(TOOLS)]]:
            epoch = run_epoch(loaders[tool], shape, check=r == 0)
            found = {k: epoch[k] for k in expected}
            if found != expected:
                raise RuntimeError(f"{tool} {crop} {size}: epoch content {found}, expected {expected}")
            if r:
                times[tool].append(epoch["seconds"])
            print(f"  {w.name} {crop}{size or ''} {'warm-up' if r == 0 else f'round {r}'} {tool:<20} "
                  f"{w.n / epoch['seconds']:8,.0f} samples/s", flush=True)
    for loader in loaders.values():
        getattr(loader, "close", lambda: None)()
    speed = {tool: w.n / statistics.median(t) for tool, t in times.items()}
    rates = {tool: {"samples_per_s": speed[tool], "epochs_s": t} for tool, t in times.items()}
    best = max((t for t in TOOLS if t != "ours"), key=lambda t: speed[t])
    result: dict[str, Any] = {"crop": crop, "size": size, "results": rates, "best_peer": best,
              "ratio_vs_best_peer": speed["ours"] / speed[best],
              "load_average_1m": os.getloadavg()[0]}
    if spec is not None:
        values, factors = decode_quality.psnrs(w.images[:200], DecodeSpec(spec.size, crop=spec.crop))
        result["psnr_db"] = {"mean": float(np.mean(values)), "min": float(np.min(values))}
        result["dct_factors"] = {str(f): factors.count(f) for f in (1, 2, 4, 8)}
    return result


def run_set(w: Workload, work: Path, rounds: int) -> dict[str, Any]:
    copies = {"litdata": write_litdata(w, work / f"{w.name}-litdata"),
              "mosaicml_streaming": write_mds(w, work / f"{w.name}-mds")}
    settings = [s for s in SETTINGS if s[1] is not None or w.shape[1]]  # full size: fixed-size images only
    out: dict[str, Any] = {"name": w.name, "title": w.title, "samples": w.n,
                           "mean_image_bytes": sum(map(len, w.images)) / w.n, "settings": {}}
    for crop, size in settings:
        out["settings"][f"{crop}{size or ''}"] = measure_setting(w, copies, crop, size, rounds)
    if w.shape[1]:
        out["decode_limit"] = decode_limit(w, WORKERS)
        out["full_vs_limit"] = full_vs_limit(w, work / f"{w.name}-long", rounds + 2)
        out["full_fraction_of_limit"] = out["full_vs_limit"]["fraction"]
    return out


def full_vs_limit(w: Workload, work: Path, rounds: int) -> dict[str, Any]:
    """Ours at full size against the decode limit in a long epoch (``w``'s images
    ``LONG_EPOCH`` times over, as a real epoch is long: a pass's start and end are a few tens
    of ms), measured in alternation with no other loader alive: each round one epoch of ours
    (2 workers, kept across epochs) and one run of ``WORKERS`` processes decoding every image
    ``LONG_EPOCH`` times with ``simplejpeg`` and doing nothing else. A busy host slows both
    alike, so the medians' ratio is the fraction."""
    root = repeated_jpeg(w, work, LONG_EPOCH)
    from pipeline.loading.make_loader import make_loader

    loader = make_loader(str(root), batch_size=BATCH, num_workers=WORKERS, seed=0)
    samples = w.n * LONG_EPOCH
    run_epoch(loader, w.shape, check=True)
    ours, limit, into_batch = [], [], []
    for r in range(rounds):
        ours.append(samples / run_epoch(loader, w.shape, check=False)["seconds"])
        limit.append(concurrent_decode_rate(w.images, WORKERS, passes=LONG_EPOCH, tries=1))
        into_batch.append(concurrent_decode_rate(w.images, WORKERS, passes=LONG_EPOCH, tries=1, batch=BATCH))
        print(f"  {w.name} full round {r + 1}: ours {ours[-1]:,.0f}/s, decode limit {limit[-1]:,.0f}/s, "
              f"decoding into a batch {into_batch[-1]:,.0f}/s", flush=True)
    loader.close()
    medians = [statistics.median(v) for v in (ours, limit, into_batch)]
    return {"epoch_samples": samples, "ours_samples_per_s": ours, "limit_samples_per_s": limit,
            "into_batch_samples_per_s": into_batch, "fraction": medians[0] / medians[1],
            "fraction_of_into_batch": medians[0] / medians[2], "ours_median": medians[0],
            "limit_median": medians[1], "into_batch_median": medians[2]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,024 images per set, 2 timed rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where decode.json and decode_section.md go")
    parser.add_argument("--report-only", action="store_true", help="redo the section from decode.json")
    args = parser.parse_args(argv)
    args.n, args.rounds = (1024, 2) if args.quick else (4096, 3)
    return args


def measure(args: argparse.Namespace, make: Callable[..., Workload] = make_jpeg) -> dict[str, Any]:
    machine = machine_info(PACKAGES)
    torch.set_num_threads(1)
    started = time.perf_counter()
    summary: dict[str, Any] = {"part": "decode", "machine": machine, "quick": args.quick, "batch_size": BATCH,
                               "num_workers": WORKERS, "timed_rounds": args.rounds, "target": TARGET,
                               "full_target": FULL_TARGET, "sets": {}}
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        for kind in ("256", "varied"):
            print(f"set {kind}: {args.n:,} photo-like JPEGs", flush=True)
            w = make(Path(tmp), args.n, kind)
            summary["sets"][w.name] = run_set(w, Path(tmp), args.rounds)
    summary["total_seconds"] = time.perf_counter() - started
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_only:
        summary = json.loads((args.out / "decode.json").read_text())
    else:
        summary = measure(args)
        write_results(args.out, "decode", summary)
    for name, s in summary["sets"].items():
        for key, r in s["settings"].items():
            print(f"{name} {key}: ours / best peer ({r['best_peer']}) = {r['ratio_vs_best_peer']:.2f}x"
                  + (f", PSNR {r['psnr_db']['mean']:.1f} dB" if "psnr_db" in r else ""))
        if "full_fraction_of_limit" in s:
            print(f"{name} full size: ours at {s['full_fraction_of_limit']:.0%} of the decode limit")
    md = write_section(summary, args.out / "decode_section.md")
    print(f"wrote {args.out / 'decode.json'}, {md}; measured in {summary['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
