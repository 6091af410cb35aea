"""Part 1 of ``make bench``: conversion throughput, ours against three peers, one process each.

Every tool writes the same synthetic VIMH train split (32x32x3 raw images, two quantized
heads) to local disk in the same shuffled order. The peers get the source already
unpickled in memory; ours is timed as the whole ``convert`` call (pickle load included)
and again with the loaded source cached in the process. Outputs are counted back before
they are deleted. Run: ``python -m benchmarks.bench_convert [--samples N] [--out docs/bench]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from benchmarks.common import DEFAULT_OUT, bar_chart, machine_info, timed, timed_cpu, write_results
from shard_tools.conversion.plan import sample_order
from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh

PACKAGES = ("multihead-shards", "webdataset", "litdata", "mosaicml-streaming", "numpy", "msgpack",
            "torch", "matplotlib")
PEERS = ("webdataset", "litdata", "mosaicml_streaming")
SHARD_SAMPLES = 10_000
CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Source:
    """The unpickled train split every peer starts from, plus the shared write order."""

    path: Path
    images: np.ndarray
    labels: list[list[int]]
    names: tuple[str, ...]
    order: list[int]

    def sample(self, i: int) -> tuple[bytes, dict[str, int]]:
        """Image bytes and ``{head: quantized value}`` of source sample ``i``."""
        lab = self.labels[i]
        heads = {self.names[lab[k]]: lab[k + 1] for k in range(1, len(lab), 2)}
        return self.images[i].tobytes(), heads


def load_source(path: Path, *, seed: int = 0) -> Source:
    with open(path / "train_batch", "rb") as f:
        batch = pickle.load(f)  # our own synthetic file
    names = tuple(json.loads((path / "vimh_dataset_info.json").read_text())["parameter_names"])
    return Source(path, np.asarray(batch["data"]), batch["vimh_labels"], names,
                  sample_order(len(batch["data"]), shuffle=True, seed=seed))


# --- the four writers: each takes the source and an empty output dir ------------------------

def run_ours(src: Source, out: Path, *, cold: bool) -> None:
    """The whole ``convert`` call. ``cold`` forces the pickle to be read and parsed again
    (the loader caches by path, mtime and size, so bumping the mtime invalidates it)."""
    if cold:
        batch = src.path / "train_batch"
        st = batch.stat()
        os.utime(batch, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    convert("vimh", src.path, out, splits=["train"], shuffle=True, seed=0,
            max_samples=SHARD_SAMPLES)


def run_webdataset(src: Source, out: Path) -> None:
    import webdataset as wds

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=SHARD_SAMPLES, verbose=0) as sink:
        for i in src.order:
            image, heads = src.sample(i)
            sink.write({"__key__": f"{i:08d}", "raw": image, "labels.msgpack": msgpack.packb(heads)})


def _litdata_block(src: Source, block: range) -> Iterator[dict[str, Any]]:
    for pos in block:
        i = src.order[pos]
        image, heads = src.sample(i)
        yield {"index": i, "image": image, **heads}


def run_litdata(src: Source, out: Path, *, block: int = 1000) -> None:
    """``optimize`` with one worker (it still forks one process) over blocks of the write
    order; ``fn`` yields one sample per index, so per-input overhead is amortized."""
    from litdata import optimize

    for var, sub in (("DATA_OPTIMIZER_CACHE_FOLDER", "chunks"), ("DATA_OPTIMIZER_DATA_CACHE_FOLDER", "data")):
        os.environ[var] = str(out.parent / "litdata-cache" / sub)  # else it creates /tmp/chunks, /tmp/data
    blocks = [range(a, min(a + block, len(src.order))) for a in range(0, len(src.order), block)]
    optimize(fn=partial(_litdata_block, src), inputs=blocks, output_dir=str(out), num_workers=1,
             chunk_bytes=CHUNK_BYTES, start_method="fork", reorder_files=False, verbose=False)


def run_mds(src: Source, out: Path) -> None:
    from streaming import MDSWriter

    heads = src.sample(src.order[0])[1]
    columns = {"index": "int", "image": "bytes", **dict.fromkeys(heads, "int")}
    with MDSWriter(out=str(out), columns=columns, size_limit=CHUNK_BYTES) as writer:
        for i in src.order:
            image, heads = src.sample(i)
            writer.write({"index": i, "image": image, **heads})


# --- read-back checks ------------------------------------------------------------------------

def count_tar_samples(out: Path) -> int:
    """Samples in every ``*.tar`` under ``out``: one ``labels.msgpack`` member each."""
    count = 0
    for shard in sorted(out.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            count += sum(m.name.endswith(".labels.msgpack") for m in tar)
    return count


def count_index(out: Path, entries: str, field: str) -> int:
    """Samples a litdata / MDS ``index.json`` claims, after checking its data files exist."""
    index = json.loads((out / "index.json").read_text())
    for entry in index[entries]:
        name = entry["filename"] if "filename" in entry else entry["raw_data"]["basename"]
        if not (out / name).is_file():
            raise RuntimeError(f"{out}: index.json names {name}, which is missing")
    return sum(int(entry[field]) for entry in index[entries])


def verify(tool: str, out: Path, expected: int) -> int:
    if tool.startswith("ours"):
        manifest = json.loads((out / "train" / "manifest.json").read_text())
        found = count_tar_samples(out)
        if manifest["num_samples"] != found:
            raise RuntimeError(f"{tool}: manifest says {manifest['num_samples']}, tars hold {found}")
    elif tool == "webdataset":
        found = count_tar_samples(out)
    elif tool == "litdata":
        found = count_index(out, "chunks", "chunk_size")
    else:
        found = count_index(out, "shards", "samples")
    if found != expected:
        raise RuntimeError(f"{tool}: wrote {found} samples, expected {expected}")
    return found


def disk_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


# --- driver ----------------------------------------------------------------------------------

def writers(src: Source) -> dict[str, Callable[[Path], None]]:
    return {"ours": partial(run_ours, src, cold=True), "ours_preloaded": partial(run_ours, src, cold=False),
            "webdataset": partial(run_webdataset, src), "litdata": partial(run_litdata, src),
            "mosaicml_streaming": partial(run_mds, src)}


def measure(src: Source, work: Path, runs: int) -> dict[str, dict[str, Any]]:
    """Each writer ``runs`` times, interleaved; keep every time, report the best."""
    times: dict[str, list[tuple[float, float]]] = {}
    sizes: dict[str, int] = {}
    for run in range(runs):
        for tool, write in writers(src).items():
            out = work / f"{tool}-{run}"
            _, wall, cpu = timed_cpu(partial(write, out))
            verify(tool, out, len(src.order))
            sizes[tool] = disk_bytes(out)
            shutil.rmtree(out)
            times.setdefault(tool, []).append((wall, cpu))
            print(f"  run {run + 1}/{runs} {tool:<19} {wall:6.2f} s wall {cpu:6.2f} s cpu "
                  f"{len(src.order) / wall:10,.0f} samples/s")
    return {tool: _stats(ts, len(src.order), sizes[tool]) for tool, ts in times.items()}


def _stats(times: list[tuple[float, float]], n: int, size: int) -> dict[str, Any]:
    wall, cpu = min(times)
    return {"samples_per_s": n / wall, "best_seconds": wall, "cpu_seconds_of_best": cpu,
            "seconds": [w for w, _ in times], "output_bytes": size}


def warm_up(work: Path) -> None:
    """Every writer once on 500 samples: imports, first-call setup, allocator warm-up."""
    path = generate_vimh(work / "vimh-32x32x3_warmup", n_train=500, n_test=16, n_heads=2)
    small = load_source(path)
    for tool, write in writers(small).items():
        write(work / f"warmup-{tool}")
        verify(tool, work / f"warmup-{tool}", 500)
    shutil.rmtree(path)


def summarize(results: dict[str, dict[str, Any]], machine: dict[str, Any], n: int, pickle_s: float,
              runs: int, quick: bool) -> dict[str, Any]:
    best_peer = max(PEERS, key=lambda t: results[t]["samples_per_s"])
    best = results[best_peer]["samples_per_s"]
    return {"part": "convert", "machine": machine, "samples": n, "runs": runs,
            "quick": quick, "image": "32x32x3 uint8 raw (3072 B)", "heads": 2,
            "source_pickle_load_s": pickle_s, "results": results, "best_peer": best_peer,
            "ratio_vs_best_peer": results["ours"]["samples_per_s"] / best,
            "ratio_preloaded_vs_best_peer": results["ours_preloaded"]["samples_per_s"] / best}


def chart(summary: dict[str, Any], out_dir: Path) -> Path:
    labels = {"ours": "ours (convert, incl. pickle load)", "ours_preloaded": "ours (source cached)",
              "webdataset": "webdataset ShardWriter", "litdata": "litdata optimize (1 worker)",
              "mosaicml_streaming": "mosaicml-streaming MDSWriter"}
    tools = list(labels)
    values = [summary["results"][t]["samples_per_s"] for t in tools]
    m = summary["machine"]
    title = (f"Conversion to shards: {summary['samples']:,} samples of 32x32x3, one process each\n"
             f"{m['usable_cpus']} CPUs, Python {m['python']}, best of {summary['runs']}")
    return bar_chart(out_dir / "convert.png", [labels[t] for t in tools], values, title=title,
                     xlabel="samples/s (higher is better)",
                     highlight=[labels["ours"], labels["ours_preloaded"]])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None, help="train samples (default 60000)")
    parser.add_argument("--quick", action="store_true", help="5000 samples, one run")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per tool (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where convert.json/png go")
    args = parser.parse_args(argv)
    args.samples = args.samples or (5000 if args.quick else 60_000)
    args.runs = args.runs or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info(PACKAGES)  # load average before we add our own
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        work = Path(tmp)
        print(f"generating {args.samples:,} synthetic VIMH samples in {work}")
        path = generate_vimh(work / "vimh-32x32x3_bench", n_train=args.samples, n_test=16,
                             variant="pickle", n_heads=2)
        src, pickle_s = timed(partial(load_source, path))
        print(f"pickle load {pickle_s:.2f} s; warming up")
        warm_up(work)
        results = measure(src, work, args.runs)
    summary = summarize(results, machine, args.samples, pickle_s, args.runs, args.quick)
    print(f"ours / best peer ({summary['best_peer']}): {summary['ratio_vs_best_peer']:.2f}x "
          f"(source cached: {summary['ratio_preloaded_vs_best_peer']:.2f}x)")
    print(f"wrote {write_results(args.out, 'convert', summary)} and {chart(summary, args.out)}")


if __name__ == "__main__":
    main()
