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


def _result_line(summary: dict[str, Any]) -> str:
    sized = [(s["name"], key, r["ratio_vs_best_peer"]) for s in summary["sets"].values()
             for key, r in s["settings"].items() if r["size"] is not None]
    low = min(v for _, _, v in sized)
    met = low >= summary["target"]
    fractions = [s["full_fraction_of_limit"] for s in summary["sets"].values() if "full_fraction_of_limit" in s]
    full_met = all(f >= summary["full_target"] for f in fractions)
    line = (f"**Result:** training sizes **{'met' if met else 'not met'}**: ours is "
            f"{low:.2f}–{max(v for _, _, v in sized):.2f}x the best peer across the {len(sized)} settings")
    if not met:
        line += " (below target: " + ", ".join(f"{n} {k} {v:.2f}x" for n, k, v in sized if v < summary["target"]) + ")"
    if fractions:
        line += (f"; full size **{'met' if full_met else 'not met'}**: "
                 + ", ".join(f"{f:.0%}" for f in fractions) + " of the decode limit")
    return line + "."


def _full_size_lines(s: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    dl, fl = s["decode_limit"], s["full_vs_limit"]
    met = "met" if s["full_fraction_of_limit"] >= summary["full_target"] else "not met"
    return [f"Full size: on one core `simplejpeg` decodes {dl['simplejpeg_per_core']:,.0f} of these "
            f"images/s and `decode_jpeg` {dl['torchvision_decode_jpeg_per_core']:,.0f}/s. The decode "
            f"limit of {dl['workers']} workers is what {dl['workers']} processes decoding every image "
            f"with `simplejpeg` at the same time, and doing nothing else, reach. Measured in "
            f"alternation with ours at full size in an epoch of {fl['epoch_samples']:,} samples (these "
            f"images {fl['epoch_samples'] // s['samples']} times over; {len(fl['ours_samples_per_s'])} "
            f"rounds each, no other loader alive), the limit's median was "
            f"{fl['limit_median']:,.0f}/s and ours {fl['ours_median']:,.0f}/s: ours moves "
            f"**{s['full_fraction_of_limit']:.0%}** of the limit into the training loop "
            f"(target {summary['full_target']:.0%}: {met}). The same processes decoding each image into "
            f"its slot of a {summary['batch_size']}-image array, as a batch must hold it (the decoded "
            f"pixels then leave the cache), reach {fl['into_batch_median']:,.0f}/s: ours is at "
            f"{fl['fraction_of_into_batch']:.0%} of that.", ""]


def write_section(summary: dict[str, Any], path: Path) -> Path:
    m = summary["machine"]
    lines = ["## Part 2b: JPEG decoded at training size", "",
             "**Question:** how many JPEG samples per second reach the training loop at the size the model "
             "takes (random resized crops of 224, 112 and 64, a resize to 32), decoded by "
             "`make_loader(decode=DecodeSpec(...))`, compared with the peers' best practice, "
             "`torchvision.io.decode_jpeg` and torchvision v2 transforms? And at full size, how close does "
             "ours come to the machine's decode limit?",
             f"**Targets (issue 16):** ours >= {summary['target']}x the best peer at every training size; at full "
             f"size >= {summary['full_target']:.0%} of the decode limit, with 2 workers, in one run.",
             _result_line(summary), "",
             "### Results", "",
             f"Samples/s (median of {summary['timed_rounds']} timed epochs after a warm-up epoch), batches of "
             f"{summary['batch_size']}, {summary['num_workers']} DataLoader workers kept across epochs, shuffled. "
             "PSNR: our images against `decode_jpeg` + v2 on the same crop box, first 200 images; DCT scale: how "
             "many of them were decoded at 1, 1/2, 1/4, 1/8. Numbers from "
             "[`docs/bench/decode.json`](bench/decode.json).", ""]
    for s in summary["sets"].values():
        lines += [f"**{s['title']}**: {s['samples']:,} images, mean {s['mean_image_bytes'] / 1024:.1f} KB.", "",
                  *table(s, summary["target"]), ""]
        if "decode_limit" in s:
            lines += _full_size_lines(s, summary)
    lines += ["### Machine", "",
              f"{m['usable_cpus']} vCPUs ({m['cpu_model']}), Python {m['python']}, torch "
              f"{m['versions']['torch']}, torchvision {m['versions']['torchvision']}, simplejpeg "
              f"{m['versions']['simplejpeg']}, opencv-python-headless {m['versions']['opencv-python-headless']}; "
              f"1-minute load average before the run {m['load_average_1m']:.2f}; the run took "
              f"{summary['total_seconds'] / 60:.0f} min.", "", *STATIC]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


STATIC = Path(__file__).with_name("decode_section_text.md").read_text().splitlines()  # what every run shares
