"""The loader benchmark's chart (``loader.png``) and markdown section (``loader_section.md``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.loader_names import ROWS, label
from benchmarks.peers import FRESH, TOOLS

ORDER = ("raw32", "jpeg256")


def chart(summary: dict[str, Any], path: Path) -> Path:
    """One panel per workload: samples/s per tool, ours highlighted; S3 and the limits marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    workloads = {name: summary["workloads"][name] for name in ORDER if name in summary["workloads"]}
    rows = sum(len(wl["results"]) + 1 for wl in workloads.values())
    fig, axes = plt.subplots(len(workloads), 1, figsize=(10, 0.42 * rows + 2.2))
    for ax, (name, wl) in zip(list(getattr(axes, "flat", [axes])), workloads.items(), strict=True):
        labels = [label(t) for t in TOOLS]
        values = [wl["results"][t]["samples_per_s"] for t in TOOLS]
        colors = ["tab:orange" if t == "ours" else "lightsteelblue" if t.endswith(FRESH) else "tab:blue"
                  for t in TOOLS]
        if name == "raw32" and "s3" in summary:
            labels.insert(1, "ours from S3 (moto, local)")
            values.insert(1, summary["s3"]["samples_per_s"])
            colors.insert(1, "navajowhite")
        bars = ax.barh(labels, values, color=colors)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=3)
        ax.invert_yaxis()
        top = max(values)
        if name == "jpeg256":
            limit = summary["decode_limit"]["limit_samples_per_s"]
            ax.axvline(limit, color="tab:red", linestyle="--", linewidth=1, label="JPEG decode limit (2 cores)")
            ax.legend(loc="lower right", fontsize=8)
            top = max(top, limit)
        ax.set_xlim(0, top * 1.22)
        ax.set_title(f"{wl['title']}: {wl['samples']:,} samples (DataLoader hand-off floor: "
                     f"{wl['dataloader_floor']['samples_per_s']:,.0f}/s)", fontsize=10)
        ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
    axes_list = list(getattr(axes, "flat", [axes]))
    axes_list[-1].set_xlabel("samples/s, median of timed epochs (higher is better)")
    m = summary["machine"]
    fig.suptitle(f"Loader read throughput: batch {summary['batch_size']}, {summary['num_workers']} DataLoader "
                 f"workers, shuffled; {m['usable_cpus']} CPUs, Python {m['python']}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def results_table(summary: dict[str, Any], name: str) -> list[str]:
    wl, versions = summary["workloads"][name], summary["machine"]["versions"]
    best = wl["results"][wl["best_peer"]]["samples_per_s"]
    lines = ["| Tool | Samples/s | Ours / tool | Tool / best peer | Epoch (s): median (min–max) | First epoch (s) |",
             "|------|----------:|------------:|-----------------:|-----------------------------|----------------:|"]
    ours = wl["results"]["ours"]["samples_per_s"]
    for tool in TOOLS:
        r = wl["results"][tool]
        rate = r["samples_per_s"]
        ratio = "—" if tool == "ours" else f"**{ours / rate:.2f}**"
        t = r["timed_epochs_s"]
        epochs = f"{r['median_epoch_s']:.2f} ({min(t):.2f}–{max(t):.2f})"
        lines.append(f"| {label(tool, ROWS, **versions)} | {_fmt(rate)} | {ratio} | {rate / best:.2f} | {epochs} | "
                     f"{r['first_epoch_s']:.2f} |")
    return lines


def _profile_lines(name: str, profile: dict[str, Any], limit: int = 8) -> list[str]:
    lines = [f"| {name}: {profile['us_per_sample']:.1f} µs/sample in one process; functions by own time "
             "(cProfile) | µs/sample |", "|---|---:|"]
    lines += [f"| `{k}` | {v:.2f} |" for k, v in profile["top_own_time_us_per_sample"][:limit]]
    return lines


def write_section(summary: dict[str, Any], path: Path) -> Path:
    from benchmarks.loader_text import comments, method

    raw, jpeg = summary["workloads"]["raw32"], summary["workloads"]["jpeg256"]
    targets = summary["targets"]

    def verdict(wl: dict[str, Any], target: float) -> str:
        met = wl["ratio_vs_best_peer"] >= target
        return (f"**{'met' if met else 'not met'}**: {wl['ratio_vs_best_peer']:.2f}x the best peer "
                f"({label(wl['best_peer'])}), {wl['ratio_vs_best_streaming_peer']:.2f}x the best streaming "
                f"peer ({label(wl['best_streaming_peer'])})")

    m, dl = summary["machine"], summary["decode_limit"]
    lines = [
        "## Part 2: loader throughput", "",
        "**Question:** how many samples per second does `make_loader` deliver into a training loop, compared "
        "with WebDataset, litdata, MosaicML Streaming and the seeds' in-memory `Dataset`, on the same data?",
        f"**Targets (product issue):** ours >= {targets['raw32']}x the best peer on workload 1, >= "
        f"{targets['jpeg256']}x on workload 2.",
        f"**Result:** workload 1 {verdict(raw, targets['raw32'])}; workload 2 {verdict(jpeg, targets['jpeg256'])}.",
        "", "### Results", "",
        f"Batch {summary['batch_size']}, {summary['num_workers']} DataLoader workers, shuffle on. Samples/s is "
        f"the median of {summary['timed_rounds']} timed full epochs (epochs 2-{summary['timed_rounds'] + 1}; "
        "the second epoch alone is `second_epoch_s` in the JSON); the first epoch, with worker start-up for "
        "every tool, is listed separately. Numbers from [`docs/bench/loader.json`](bench/loader.json).", "",
        f"**Workload 1**: {raw['samples']:,} samples, {raw['title']} ({raw['mean_image_bytes']:,.0f} B per "
        f"image), {raw['our_shards']} shards.", "", *results_table(summary, "raw32"), "",
    ]
    if "s3" in summary:
        s3 = summary["s3"]
        lines += [f"Ours reading the same shards from S3 (a local moto server): {_fmt(s3['samples_per_s'])} "
                  f"samples/s, **{s3['fraction_of_local']:.2f}** of the local rate.", ""]
    lines += [
        f"**Workload 2**: {jpeg['samples']:,} samples, {jpeg['title']} (mean {jpeg['mean_image_bytes'] / 1024:.1f} "
        f"KB per JPEG), {jpeg['our_shards']} shards.", "", *results_table(summary, "jpeg256"), "",
        f"JPEG decode limit of this machine: on one core `torchvision.io.decode_jpeg` decodes "
        f"{_fmt(dl['torchvision_decode_jpeg_per_core'])} of these images/s, `simplejpeg` "
        f"{_fmt(dl.get('simplejpeg_per_core', 0.0))}/s (Pillow: {_fmt(dl['pillow_per_core'])}/s); "
        f"{dl['workers']} processes decoding with `simplejpeg` at the same time, and doing nothing else, reach "
        f"**{_fmt(dl['limit_samples_per_s'])} samples/s**. Ours reaches "
        f"{jpeg['results']['ours']['samples_per_s'] / dl['limit_samples_per_s']:.0%} of it.", "",
        "![Loader throughput](bench/loader.png)", "",
        *method(summary), "",
        "### Machine", "",
        f"{m['usable_cpus']} vCPUs ({m['cpu_model']}), {m['platform']}, Python {m['python']}, torch "
        f"{m['versions']['torch']} (CPU), torchvision {m['versions']['torchvision']}. 1-minute load average "
        f"before the run: {m['load_average_1m']:.2f}. The benchmark's main process and its two workers share "
        "the two cores; the box is shared with other jobs. Exact versions are in the JSON.", "",
        "### How to reproduce", "", "```bash slow",
        f"make bench      # part 2 is benchmarks.bench_loader: the full run, {summary['total_seconds'] / 60:.0f} "
        "min here",
        ".venv/bin/python -m benchmarks.bench_loader --quick --out out/bench   # 12,000 + 1,000 samples, 2 rounds",
        "```", "",
        "Work files go to a temporary directory removed at the end; `--out` (default `docs/bench`) gets "
        "`loader.json`, `loader.png` and this section as `loader_section.md`. `--no-s3` skips the moto part.", "",
        "### Comments", "", *comments(summary), "",
        "Where ours spends its time, in one process (`num_workers=0`, so no hand-off; the JSON also lists "
        "cumulative times of every `pipeline/` function):", "",
        *_profile_lines("Workload 1", summary["profile"]["raw32"]), "",
        *_profile_lines("Workload 2", summary["profile"]["jpeg256"]), "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
