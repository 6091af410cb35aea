"""Existing WebDataset shards (``webdataset.ShardWriter`` or ``tar``) as a source format."""

from __future__ import annotations

from shard_tools.formats.base import CliOption, FormatEntry
from shard_tools.formats.webdataset.reader import ON_BAD, configure

FORMAT = FormatEntry(
    name="webdataset", help="webdataset (existing WebDataset .tar files; heads from --head NAME=FIELD:CLASSES)",
    configure=configure,
    options=(CliOption("--head", "heads", "a head and where a sample holds it: NAME=FIELD:CLASSES, FIELD a member "
                       "extension (cls) or json.<key> (repeatable)", action="append", metavar="NAME=FIELD:CLASSES"),
             CliOption("--on-bad", "on_bad", "samples without an image or a head's field (default error)",
                       choices=ON_BAD),
             CliOption("--split-name", "split_name", "the split of a SRC that holds its .tar files directly "
                       "(default train)", metavar="NAME")))
