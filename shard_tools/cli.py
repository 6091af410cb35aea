"""The ``shards`` command: generate, convert, validate and inspect shard sets."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from pipeline.errors import ConversionError, PipelineError

log = logging.getLogger("shards")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``"64MB"``, ``"1.5G"`` or ``"1000"`` as a byte count (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 256MB, found {text!r}")
    return int(float(match[1]) * 1024 ** " KMG".index(match[2].upper() or " "))


def parse_dims(text: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxWxC such as 32x32x3, found {text!r}")
    return int(match[1]), int(match[2]), int(match[3])


def _convert(args: argparse.Namespace) -> int:
    from shard_tools.convert import convert

    given = {"class_list": args.class_list, "resize": args.resize, "quality": args.quality, "on_bad": args.on_bad}
    manifests = convert(args.format, args.src, args.out, splits=args.split or None,
                        shuffle=not args.no_shuffle, seed=args.seed,
                        max_samples=args.max_samples or None, max_bytes=args.max_bytes or None,
                        options={k: v for k, v in given.items() if v is not None}, workers=args.workers,
                        num_nodes=args.num_nodes, node_rank=args.node_rank, work_dir=args.work_dir)
    for split, m in manifests.items():
        print(f"{split}: {m.num_samples} samples in {len(m.shards)} shards -> {args.out.rstrip('/')}/{split}")
    if args.num_nodes > 1:
        print(f"node {args.node_rank} of {args.num_nodes} done; when every node is, run: shards manifest {args.out}")
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from shard_tools.nodes import merge_manifests

    for split, m in merge_manifests(args.out).items():
        print(f"{split}: {m.num_samples} samples in {len(m.shards)} shards, manifest written")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from shard_tools.validate import validate

    report = validate(args.source, decode=args.decode, progress=None if not args.quiet else False)
    for problem in report.problems:
        print(problem)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    splits = ", ".join(f"{k}: {v}" for k, v in report.splits.items())
    verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{verdict}: {report.shards} shards, {report.samples} samples, {report.bytes} bytes"
          f"{' (' + splits + ')' if splits else ''}")
    return 0 if report.ok else 1


def _inspect(args: argparse.Namespace) -> int:
    from shard_tools.inspect import summarize, write_grid

    summary = summarize(args.source)
    if args.json:
        print(json.dumps(summary, indent=2))
    for entry in [] if args.json else summary:
        schema = entry["schema"]
        image = schema["image"]
        print(f"{schema['name']} [{entry['split']}]: {entry['samples']} samples in {entry['shards']} "
              f"shards; image {image['height']}x{image['width']}x{image['channels']} "
              f"{image['encoding']} {image['layout']}")
        for head in schema["heads"]:
            extra = (f" range {head['min']}..{head['max']} step {head['step']}"
                     if head["kind"] == "quantized" else "")
            print(f"  head {head['name']}: {head['kind']}, {head['num_classes']} classes{extra}")
    if args.grid:
        print(f"grid -> {write_grid(args.source, args.grid, count=args.count)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from shard_tools.synthetic import generate_vimh
    from shard_tools.synthetic_cifar import generate_cifar100, generate_cifar100mh
    from shard_tools.synthetic_imagenet import generate_imagenet100

    if args.bad_files and args.format != "imagenet100":
        raise ConversionError(f"--bad-files: for --format imagenet100 only, found --format {args.format}")
    if args.format == "imagenet100":
        out = generate_imagenet100(args.out, n_train=3 if args.train is None else args.train,
                                   n_val=1 if args.test is None else args.test, bad_files=args.bad_files,
                                   seed=args.seed)
        print(f"synthetic ImageNet-100 source (CMC classes) -> {out}")
        return 0
    args.train = 2048 if args.train is None else args.train
    args.test = 512 if args.test is None else args.test
    if args.format == "cifar100mh":
        out = generate_cifar100mh(args.out, n_train=args.train, n_test=args.test, seed=args.seed)
        print(f"synthetic CIFAR-100-MH source -> {out}")
    elif args.format == "cifar100":
        out = generate_cifar100(args.out, n_train=args.train, n_test=args.test, seed=args.seed)
        print(f"synthetic CIFAR-100 (python release layout) source -> {out}")
    else:
        h, w, c = args.size
        out = generate_vimh(args.out, n_train=args.train, n_test=args.test, height=h, width=w,
                            channels=c, n_heads=args.heads, variant=args.variant, seed=args.seed)
        print(f"synthetic VIMH source -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shards", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a source dataset into shards")
    p.add_argument("format", help="source format: vimh, cifar100mh (CIFAR-100-MH or the CIFAR-100 "
                                  "python release, detected) or imagenet100")
    p.add_argument("src", help="source dataset directory")
    p.add_argument("out", help="output directory (one subdirectory per split)")
    p.add_argument("--split", action="append", help="convert only this split (repeatable)")
    p.add_argument("--max-samples", type=int, default=10_000, help="samples per shard (0: no limit)")
    p.add_argument("--max-bytes", type=parse_bytes, default=parse_bytes("256MB"),
                   help="bytes per shard, e.g. 64MB (0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle")
    p.add_argument("--no-shuffle", action="store_true", help="keep source order")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that read and encode samples (the shards are the same for any number); one "
                        "process already hashes on a second core, so use about one per 1.5 cores")
    p.add_argument("--num-nodes", type=int, default=1, help="machines sharing the conversion (see docs/conversion.md)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's number, 0..num-nodes-1")
    p.add_argument("--work-dir", help="OUT is a URL: build the shards in a subdirectory of this before "
                                      "uploading (default: ~/.cache/multihead-shards/convert; kept after a "
                                      "failure so a re-run resumes)")
    p.add_argument("--class-list", metavar="cmc|hjepa|FILE",
                   help="imagenet100 only: the class list (default cmc; FILE: one wnid per line, optional name)")
    p.add_argument("--resize", type=int, metavar="N", help="imagenet100 only: re-encode with shorter side N")
    p.add_argument("--quality", type=int, metavar="Q", help="imagenet100 only: JPEG quality of re-encoded "
                                                            "images (default 90)")
    p.add_argument("--on-bad", choices=["convert", "skip", "error"],
                   help="imagenet100 only: non-RGB or non-JPEG files (default convert; unreadable ones are "
                        "skipped unless error)")
    p.set_defaults(run=_convert)

    p = sub.add_parser("manifest", help="merge the node manifests of a multi-node conversion")
    p.add_argument("out", help="the conversion's output directory")
    p.set_defaults(run=_manifest)

    p = sub.add_parser("validate", help="check shards and report every problem")
    p.add_argument("source", nargs="+", help="shard directory, manifest, shard URLs or brace pattern")
    p.add_argument("--json", metavar="REPORT", help="also write the report as JSON")
    p.add_argument("--decode", action="store_true", help="decode every image and check its shape")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_validate)

    p = sub.add_parser("inspect", help="print schema and counts; write a PNG grid of samples")
    p.add_argument("source", help="shard directory, manifest, shard URL or brace pattern")
    p.add_argument("--grid", metavar="PNG", help="write a labelled grid of samples here")
    p.add_argument("--count", type=int, default=16, help="samples in the grid")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("generate", help="write a synthetic source (learnable labels)")
    p.add_argument("out", help="directory to create, e.g. data/vimh-32x32x3_demo")
    p.add_argument("--format", default="vimh", choices=["vimh", "cifar100mh", "cifar100", "imagenet100"],
                   help="vimh; cifar100mh (CIFAR-100-MH layout); cifar100 (CIFAR-100 python release layout); "
                        "imagenet100 (train/ and val/ JPEG folders, CMC classes)")
    p.add_argument("--train", type=int, help="train samples (default 2048; imagenet100: per class, 3)")
    p.add_argument("--test", type=int, help="test samples (default 512; imagenet100: val per class, 1)")
    p.add_argument("--bad-files", action="store_true",
                   help="imagenet100 only: add a grayscale, a CMYK and a PNG-in-disguise train file")
    p.add_argument("--size", type=parse_dims, default=(32, 32, 3), help="HxWxC (vimh only; CIFAR is 32x32x3)")
    p.add_argument("--heads", type=int, default=2, help="vimh only")
    p.add_argument("--variant", default="pickle", choices=["pickle", "binary", "binary-v1", "both"],
                   help="vimh only")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
