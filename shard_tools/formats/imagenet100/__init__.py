"""ImageNet-100: JPEG folders by wnid and a class list (``docs/sources/imagenet100.md``)."""

from __future__ import annotations

from pathlib import Path

from shard_tools.formats.base import CliOption, FormatEntry, Generator
from shard_tools.formats.imagenet100.reader import ON_BAD, configure
from shard_tools.formats.imagenet100.synthetic import generate_imagenet100


def _generate(out: str | Path, *, n_train: int, n_test: int, seed: int, bad_files: bool | None = None) -> Path:
    return generate_imagenet100(out, n_train=n_train, n_val=n_test, bad_files=bool(bad_files), seed=seed)


FORMAT = FormatEntry(
    name="imagenet100", help="imagenet100 (train/ and val/ JPEG folders by wnid)",
    configure=configure,
    options=(CliOption("--class-list", "class_list", "the class list (default cmc; FILE: one wnid per line, "
                       "optional name)", metavar="cmc|hjepa|FILE"),
             CliOption("--resize", "resize", "re-encode with shorter side N", type=int, metavar="N"),
             CliOption("--quality", "quality", "JPEG quality of re-encoded images (default 90)", type=int,
                       metavar="Q"),
             CliOption("--on-bad", "on_bad", "non-RGB or non-JPEG files (default convert; unreadable ones are "
                       "skipped unless error)", choices=ON_BAD)),
    generators=(Generator("imagenet100", "train/ and val/ JPEG folders, CMC classes (sizes: per class)",
                          _generate, (3, 1),
                          options=(CliOption("--bad-files", "bad_files", "add a grayscale, a CMYK and a "
                                             "PNG-in-disguise train file", action="store_true"),),
                          done_message="synthetic ImageNet-100 source (CMC classes)"),))
