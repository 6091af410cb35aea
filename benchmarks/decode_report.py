"""Part 2b's markdown section (``decode_section.md``) from ``decode.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAMES = {"ours": "**ours** (`decode=DecodeSpec(...)`)", "webdataset": "webdataset",
         "litdata": "litdata", "mosaicml_streaming": "MosaicML streaming"}
PEERS = ("webdataset", "litdata", "mosaicml_streaming")


def _setting_name(r: dict[str, Any]) -> str:
    if r["size"] is None:
        return "full size (no resize)"
    return f"RandomResizedCrop {r['size']} + flip" if r["crop"] == "random" else f"Resize {r['size']}x{r['size']}"


def table(s: dict[str, Any], target: float) -> list[str]:
    head = ["| reads as | " + " | ".join(NAMES[t] for t in ("ours", *PEERS)) + " | ours / best peer | PSNR dB "
            "(mean, min) | DCT scale 1/2/4/8 |",
            "|---|" + "---:|" * (len(PEERS) + 3) + "---|"]
    rows = []
    for r in s["settings"].values():
        rates = [r["results"][t]["samples_per_s"] for t in ("ours", *PEERS)]
        ratio = r["ratio_vs_best_peer"]
        mark = "" if r["size"] is None else (" ✓" if ratio >= target else " ✗")
        psnr = f"{r['psnr_db']['mean']:.1f}, {r['psnr_db']['min']:.1f}" if "psnr_db" in r else "exact"
        factors = "/".join(str(r["dct_factors"][f]) for f in ("1", "2", "4", "8")) if "dct_factors" in r else "–"
        rows.append(f"| {_setting_name(r)} | " + " | ".join(f"{v:,.0f}" for v in rates)
                    + f" | **{ratio:.2f}x**{mark} | {psnr} | {factors} |")
    return head + rows


def write_section(summary: dict[str, Any], path: Path) -> Path:
    m = summary["machine"]
    lines = ["## Part 2b: JPEG decoded at training size", "",
             f"Samples/s (median of {summary['timed_rounds']} timed epochs after a warm-up epoch), batches of "
             f"{summary['batch_size']}, {summary['num_workers']} DataLoader workers kept across epochs, shuffled. "
             "Peers: `torchvision.io.decode_jpeg`, then torchvision v2 transforms with `antialias=True`, in their "
             "documented dataset pattern. Target: ours at least "
             f"{summary['target']}x the best peer at every training size. PSNR: our images against "
             "`decode_jpeg` + v2 on the same crop box, first 200 images; DCT scale: how many of them were decoded "
             "at 1, 1/2, 1/4, 1/8.", ""]
    for s in summary["sets"].values():
        lines += [f"**{s['title']}**: {s['samples']:,} images, mean {s['mean_image_bytes'] / 1024:.1f} KB.", "",
                  *table(s, summary["target"]), ""]
        if "decode_limit" in s:
            dl = s["decode_limit"]
            met = "met" if s["full_fraction_of_limit"] >= summary["full_target"] else "not met"
            lines += [f"Full size: on one core `simplejpeg` decodes {dl['simplejpeg_per_core']:,.0f} of these "
                      f"images/s and `decode_jpeg` {dl['torchvision_decode_jpeg_per_core']:,.0f}/s, so "
                      f"{dl['workers']} workers cannot exceed about {dl['limit_samples_per_s']:,.0f} samples/s. "
                      f"Ours moves **{s['full_fraction_of_limit']:.0%}** of that into the training loop "
                      f"(target {summary['full_target']:.0%}: {met}).", ""]
    missed = [(s["name"], key, r["ratio_vs_best_peer"]) for s in summary["sets"].values()
              for key, r in s["settings"].items()
              if r["size"] is not None and r["ratio_vs_best_peer"] < summary["target"]]
    if missed:
        lines += ["Below target in this run: " + ", ".join(f"{n} {k} ({v:.2f}x)" for n, k, v in missed) + ".", ""]
    lines += [f"Machine: {m['usable_cpus']} vCPUs ({m['cpu_model']}), Python {m['python']}, torch "
              f"{m['versions']['torch']}, torchvision {m['versions']['torchvision']}, simplejpeg "
              f"{m['versions']['simplejpeg']}, opencv-python-headless {m['versions']['opencv-python-headless']}; "
              f"1-minute load average before the run {m['load_average_1m']:.2f}. Run: "
              "`python -m benchmarks.bench_decode` (`--quick`: 1,024 images per set); results in "
              "`docs/bench/decode.json`.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
