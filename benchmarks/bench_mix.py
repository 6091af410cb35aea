"""Part 5 of ``make bench``: mixing three sources by weight, ours against webdataset's
``RandomMix`` and litdata's ``CombinedStreamingDataset``.

Three VIMH raw 32x32x3 sources of very different sizes (120,000, 24,000 and 2,400 samples)
are mixed 0.6 / 0.3 / 0.1 into epochs of 60,000 samples, batches of 256, two DataLoader
workers, every source in shards of 1,200 samples. Each epoch we count the samples of each
source and report the proportion error (max over sources of |realized share - weight|),
the samples the epoch held, and samples/s.
Ours is also compared with our own single-source loader over a fourth source of exactly
one epoch's samples (60,000), the same work per epoch without mixing; and the same for
256x256 JPEG sources (3,000, 1,000 and 200 images; epochs of 2,000), where decoding
dominates as it does in most training.
Run: ``python -m benchmarks.bench_mix [--quick] [--out docs/bench]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import DEFAULT_OUT, bar_chart, machine_info, write_results
from benchmarks.peers import _wds_raw
from benchmarks.workloads import Workload, make_jpeg256, make_raw32, write_litdata
from pipeline import MixSource, make_loader, mix
from pipeline.io.reading import read_manifest

PACKAGES = ("multihead-shards", "webdataset", "litdata", "torch", "numpy", "matplotlib")
NAMES = ("a", "b", "c")
WEIGHTS = (0.6, 0.3, 0.1)
BATCH, WORKERS = 256, 2
SHARD_SAMPLES = 1200  # every raw source in shards of this many samples (the smallest source: 2 shards)
TOLERANCE = 0.10  # mixed throughput at least 90% of the single-source loader's

# Each tool's epochs yield (batch size, per-source counts of the batch).
Counted = Iterator[tuple[int, np.ndarray]]


def _counts(sources: torch.Tensor) -> np.ndarray:
    return np.bincount(np.asarray(sources), minlength=len(NAMES))


def ours_mix(works: list[Workload], epoch: int) -> Callable[[], Counted]:
    """``pipeline.mix`` with weights 0.6/0.3/0.1 and ``epoch_samples``; counts from the
    ``dataset`` label of every sample."""
    loader = mix([MixSource(str(w.ours), weight=wt, name=n) for w, wt, n in zip(works, WEIGHTS, NAMES, strict=True)],
                 batch_size=BATCH, epoch_samples=epoch, num_workers=WORKERS, seed=0)
    return lambda: ((len(images), _counts(labels["dataset"])) for images, labels in loader)


def ours_single(single: Workload) -> Callable[[], Counted]:
    """Our loader over one source of exactly an epoch's samples (the same per-epoch work)."""
    loader = make_loader(str(single.ours), batch_size=BATCH, num_workers=WORKERS, seed=0)
    one = np.array([1, 0, 0])
    return lambda: ((len(images), len(images) * one) for images, _ in loader)


def _wds_tag(shape: tuple[int, int, int], k: int, sample: tuple[bytes, bytes]) -> tuple[np.ndarray, int]:
    return _wds_raw(shape, sample[0]), k


def webdataset_mix(works: list[Workload], epoch: int) -> Callable[[], Counted]:
    """``RandomMix`` of one ``WebDataset(...).shuffle(1000)`` pipeline per source, as its
    README shows, in a DataLoader; ``longest=False`` (the default): it stops when a source ends."""
    import webdataset as wds

    pipelines = []
    for k, w in enumerate(works):
        urls = [str(w.ours / "train" / s.name) for s in read_manifest(str(w.ours / "train" / "manifest.json")).shards]
        pipelines.append(wds.WebDataset(urls, shardshuffle=len(urls), workersplitter=wds.split_by_worker,
                                        nodesplitter=wds.split_by_node, seed=0)
                         .shuffle(1000).to_tuple(w.encoding, "labels.msgpack").map(partial(_wds_tag, w.shape, k)))
    mixed = wds.RandomMix(pipelines, probs=list(WEIGHTS), longest=False)
    loader = DataLoader(mixed, batch_size=BATCH, num_workers=WORKERS)
    return lambda: ((len(images), _counts(sources)) for images, sources in loader)


def _lit_tag(shape: tuple[int, int, int], k: int, item: dict[str, Any]) -> tuple[np.ndarray, int]:
    return np.frombuffer(item["image"], np.uint8).reshape(shape), k


def litdata_mix(works: list[Workload], epoch: int, copies: list[Path]) -> Callable[[], Counted]:
    """``CombinedStreamingDataset(weights=..., iterate_over_all=False)`` (weights are only
    used in that mode) over one ``StreamingDataset(shuffle=True)`` per source."""
    from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset

    datasets = [StreamingDataset(str(c), cache_dir=str(c.parent / f"{c.name}-cache"), shuffle=True, seed=0,
                                 transform=partial(_lit_tag, w.shape, k))
                for k, (w, c) in enumerate(zip(works, copies, strict=True))]
    combined = CombinedStreamingDataset(datasets, weights=list(WEIGHTS), iterate_over_all=False, seed=0)
    loader = StreamingDataLoader(combined, batch_size=BATCH, num_workers=WORKERS)
    return lambda: ((len(images), _counts(sources)) for images, sources in loader)


def run_epochs(make: Callable[[], Counted], epoch: int, epochs: int) -> list[dict[str, Any]]:
    """Each epoch: per-source counts, samples, seconds (stopping at ``epoch`` samples)."""
    out = []
    for _ in range(epochs):
        counts, start = np.zeros(len(NAMES), np.int64), time.perf_counter()
        for _size, per_source in make():
            counts += per_source
            if counts.sum() >= epoch:
                break
        seconds = time.perf_counter() - start
        total = int(counts.sum())
        shares = counts / max(1, total)
        out.append({"counts": counts.tolist(), "samples": total, "seconds": seconds,
                    "proportion_error": float(np.abs(shares - np.asarray(WEIGHTS)).max())})
    return out


def steady_rate(epochs: list[dict[str, Any]]) -> float:
    """Samples/s after the first epoch (which includes starting workers)."""
    steady = epochs[1:] or epochs
    return sum(e["samples"] for e in steady) / sum(e["seconds"] for e in steady)


def summarize(epochs: list[dict[str, Any]], target: int) -> dict[str, Any]:
    return {"epochs": epochs, "max_proportion_error": max(e["proportion_error"] for e in epochs),
            "min_samples_per_epoch": min(e["samples"] for e in epochs), "target_samples_per_epoch": target,
            "samples_per_s": steady_rate(epochs)}


def compare_throughput(tools: dict[str, Callable[[], Counted]], epoch: int, epochs: int,
                       rounds: int) -> dict[str, list[float]]:
    """Steady samples/s of each tool in ``rounds`` alternating rounds (drift hits all alike)."""
    rates: dict[str, list[float]] = {name: [] for name in tools}
    for _ in range(rounds):
        for name, make in tools.items():
            rates[name].append(steady_rate(run_epochs(make, epoch, epochs)))
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sources a tenth the size, 3 epochs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where mix.json/png go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import tempfile

    args = parse_args(argv)
    scale = 10 if args.quick else 1
    sizes = [120_000 // scale, 24_000 // scale, 2_400 // scale]
    epoch, epochs, rounds = 60_000 // scale, (3 if args.quick else 6), (1 if args.quick else 3)
    machine = machine_info(PACKAGES)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-mix-") as tmp:
        work = Path(tmp)
        works = [make_raw32(work / name, n, SHARD_SAMPLES // scale) for name, n in zip(NAMES, sizes, strict=True)]
        single = make_raw32(work / "single", epoch, SHARD_SAMPLES // scale)
        copies = [write_litdata(w, work / f"{name}-litdata") for w, name in zip(works, NAMES, strict=True)]
        ours = {"ours_mix": ours_mix(works, epoch), "ours_single_source": ours_single(single)}
        rates = compare_throughput(ours, epoch, epochs, rounds)
        jpeg_epoch = 2000 // scale
        jpegs = [make_jpeg256(work / f"jpeg-{name}", n // scale, seed=k)
                 for k, (name, n) in enumerate(zip(NAMES, (3000, 1000, 200), strict=True))]
        jpeg_single = make_jpeg256(work / "jpeg-single", jpeg_epoch, seed=9)
        jpeg_rates = compare_throughput({"ours_mix": ours_mix(jpegs, jpeg_epoch),
                                         "ours_single_source": ours_single(jpeg_single)}, jpeg_epoch, 4, rounds)
        peers = {"webdataset_RandomMix": webdataset_mix(works, epoch),
                 "litdata_CombinedStreamingDataset": litdata_mix(works, epoch, copies)}
        for tool, make in {**ours, **peers}.items():
            results[tool] = summarize(run_epochs(make, epoch, 3), epoch)
            if tool == "ours_single_source":  # one source: no proportions to judge
                results[tool]["max_proportion_error"] = None
            if tool in rates:
                results[tool].update(samples_per_s=max(rates[tool]), samples_per_s_rounds=rates[tool])
            r = results[tool]
            error = "-" if r["max_proportion_error"] is None else f"{r['max_proportion_error']:.4f}"
            print(f"{tool:<34} max error {error:>6}  min samples/epoch "
                  f"{r['min_samples_per_epoch']:>7,} of {epoch:,}  {r['samples_per_s']:>10,.0f} samples/s")
    ratio = results["ours_mix"]["samples_per_s"] / results["ours_single_source"]["samples_per_s"]
    jpeg = {k: max(v) for k, v in jpeg_rates.items()}
    jpeg_ratio = jpeg["ours_mix"] / jpeg["ours_single_source"]
    summary = {"part": "mix", "machine": machine, "quick": args.quick, "sizes": dict(zip(NAMES, sizes, strict=True)),
               "weights": dict(zip(NAMES, WEIGHTS, strict=True)), "epoch_samples": epoch,
               "throughput_epochs": epochs, "throughput_rounds": rounds, "batch_size": BATCH, "workers": WORKERS,
               "results": results, "ours_mix_over_single_source": ratio,
               "jpeg256": {"sizes": dict(zip(NAMES, (3000 // scale, 1000 // scale, 200 // scale), strict=True)),
                           "epoch_samples": jpeg_epoch, "samples_per_s": jpeg, "samples_per_s_rounds": jpeg_rates,
                           "ours_mix_over_single_source": jpeg_ratio},
               "targets": {"max_proportion_error": 0.0, "mix_over_single_source": 1 - TOLERANCE},
               "target_error_met": results["ours_mix"]["max_proportion_error"] == 0.0,
               "target_throughput_met": ratio >= 1 - TOLERANCE,
               "target_throughput_met_jpeg256": jpeg_ratio >= 1 - TOLERANCE}
    print(f"256x256 JPEG: ours mix {jpeg['ours_mix']:,.0f} samples/s, single source {jpeg['ours_single_source']:,.0f}"
          f" ({jpeg_ratio:.2f})")
    print(f"ours mix / ours single source = {ratio:.2f} (target >= {1 - TOLERANCE:.2f}); proportion error "
          f"{results['ours_mix']['max_proportion_error']:.4f} (target 0)")
    labels = list(results)
    chart = bar_chart(args.out / "mix.png", labels, [results[t]["samples_per_s"] for t in labels],
                      title=f"Mixing 3 sources 0.6/0.3/0.1, epochs of {epoch:,}, batch {BATCH}, {WORKERS} workers",
                      xlabel="samples/s (higher is better)", highlight=["ours_mix"])
    print(f"wrote {write_results(args.out, 'mix', summary)} and {chart}")


if __name__ == "__main__":
    main()
