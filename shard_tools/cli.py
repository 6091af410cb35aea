"""The ``shards`` command: generate, convert, validate and inspect shard sets."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConversionError, PipelineError
from shard_tools.formats import FORMATS, generators
from shard_tools.formats.base import CliOption

log = logging.getLogger("shards")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``"64MB"``, ``"1.5G"`` or ``"1000"`` as a byte count (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 256MB, found {text!r}")
    return int(float(match[1]) * 1024 ** " KMG".index(match[2].upper() or " "))


def _given(args: argparse.Namespace, options: Sequence[CliOption]) -> dict[str, Any]:
    """Which of ``options`` the command line gives, by keyword."""
    return {o.dest: getattr(args, o.dest) for o in options if getattr(args, o.dest, None) is not None}


def _convert(args: argparse.Namespace) -> int:
    from shard_tools.convert import convert

    options = _given(args, [o for entry in FORMATS.values() for o in entry.options])  # the format checks them
    manifests = convert(args.format, args.src, args.out, splits=args.split or None,
                        shuffle=not args.no_shuffle, seed=args.seed,
                        max_samples=args.max_samples or None, max_bytes=args.max_bytes or None,
                        options=options, workers=args.workers,
                        num_nodes=args.num_nodes, node_rank=args.node_rank, work_dir=args.work_dir)
    for split, m in manifests.items():
        print(f"{split}: {m.num_samples} samples in {len(m.shards)} shards -> {args.out.rstrip('/')}/{split}")
    if args.num_nodes > 1:
        print(f"node {args.node_rank} of {args.num_nodes} done; when every node is, run: shards manifest {args.out}")
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from shard_tools.manifests import write_manifests

    for split, (m, done) in write_manifests(args.out).items():
        print(f"{split}: {m.num_samples} samples in {len(m.shards)} shards, manifest {done}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from shard_tools.validate import validate

    report = validate(args.source, decode=args.decode, progress=None if not args.quiet else False)
    for problem in report.problems:
        print(problem)
    if report.unresolved:
        print(f"error: could not read {', '.join(report.unresolved)}: nothing there was validated", file=sys.stderr)
        return 2
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
        print(f"{schema['name']} [{entry['split']}]: {entry['samples']} samples in {entry['shards']} "
              f"shards; image {entry['image']}")
        if entry["incomplete"]:
            print(f"  warning: {entry['incomplete']}")
        for head in schema["heads"]:
            extra = (f" range {head['min']}..{head['max']} step {head['step']}"
                     if head["kind"] == "quantized" else "")
            print(f"  head {head['name']}: {head['kind']}, {head['num_classes']} classes{extra}")
    if args.grid:
        print(f"grid -> {write_grid(args.source, args.grid, count=args.count)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    generator = generators()[args.format]
    for name, other in generators().items():
        for option in other.options:
            if name != args.format and option not in generator.options and getattr(args, option.dest) is not None:
                raise ConversionError(f"{option.flag}: for --format {name} only, found --format {args.format}")
    options = _given(args, generator.options)
    train, test = generator.defaults
    out = generator.run(args.out, n_train=train if args.train is None else args.train,
                        n_test=test if args.test is None else args.test, seed=args.seed, **options)
    print(f"{generator.done_message} -> {out}")
    return 0


def _add_options(parser: argparse.ArgumentParser, owned: Mapping[str, Sequence[CliOption]]) -> None:
    """Every format's options; an option several formats share (``--on-bad``) is added once,
    its help naming each and its choices their union (each format checks its own)."""
    merged: dict[str, tuple[CliOption, list[str], list[str]]] = {}
    for name, options in owned.items():
        for option in options:
            _, helps, choices = merged.setdefault(option.flag, (option, [], []))
            helps.append(f"{name}: {option.help}")
            choices.extend(c for c in option.choices or () if c not in choices)
    for flag, (option, helps, choices) in merged.items():
        kwargs = option.argparse_kwargs()
        kwargs["help"] = "; ".join(helps)
        if choices:
            kwargs["choices"] = choices
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shards", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a source dataset into shards")
    p.add_argument("format",
                   help="source format: " + "; ".join(entry.help for entry in FORMATS.values()))
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
    _add_options(p, {name: entry.options for name, entry in FORMATS.items()})
    p.set_defaults(run=_convert)

    p = sub.add_parser("manifest", help="merge a multi-node conversion's node manifests, or rebuild a split's "
                                        "missing or stale manifest after checking its shards")
    p.add_argument("out", help="a shard-set root (split directories) or one split directory")
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
    p.add_argument("--format", default="vimh", choices=sorted(generators()),
                   help="; ".join(f"{name}: {g.help}" for name, g in generators().items()))
    p.add_argument("--train", type=int, help="train samples (default: the format's, e.g. 2048)")
    p.add_argument("--test", type=int, help="test samples (default: the format's, e.g. 512)")
    p.add_argument("--seed", type=int, default=0)
    _add_options(p, {name: g.options for name, g in generators().items()})
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
