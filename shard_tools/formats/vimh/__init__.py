"""VIMH: an image plus N quantized synthesis parameters (``docs/sources/vimh.md``)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from shard_tools.formats.base import CliOption, FormatEntry, Generator
from shard_tools.formats.vimh.reader import VimhFormat
from shard_tools.formats.vimh.synthetic import generate_vimh


def parse_dims(text: str) -> tuple[int, int, int]:
    """``"32x32x3"`` as (height, width, channels)."""
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxWxC such as 32x32x3, found {text!r}")
    return int(match[1]), int(match[2]), int(match[3])


def _generate(out: str | Path, *, n_train: int, n_test: int, seed: int, size: tuple[int, int, int] | None = None,
              heads: int | None = None, variant: str | None = None) -> Path:
    height, width, channels = size or (32, 32, 3)
    return generate_vimh(out, n_train=n_train, n_test=n_test, height=height, width=width, channels=channels,
                         n_heads=2 if heads is None else heads, variant=variant or "pickle", seed=seed)


FORMAT = FormatEntry(
    name="vimh", help="vimh (pickle, binary or old binary files plus vimh_dataset_info.json)",
    configure=VimhFormat,
    generators=(Generator("vimh", "VIMH pickles or binary files with learnable labels", _generate, (2048, 512),
                          options=(CliOption("--size", "size", "HxWxC (default 32x32x3)", type=parse_dims),
                                   CliOption("--heads", "heads", "quantized heads (default 2)", type=int),
                                   CliOption("--variant", "variant", "file variant (default pickle)",
                                             choices=("pickle", "binary", "binary-v1", "both"))),
                          done_message="synthetic VIMH source"),))
