"""ImageNet class lists: the CMC and H-JEPA lists of 100 classes shipped with the package
(``shard_tools/formats/imagenet100/<name>.txt``), or a user's file, one wnid per line with an
optional name after it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pipeline.errors import ConversionError

BUILTIN_LISTS = ("cmc", "hjepa")


@dataclass(frozen=True)
class ClassList:
    """The classes in label order: ``wnids`` (directory names), ``names`` (the schema's
    class names: a list file's second column, else the wnids) and ``source`` (provenance)."""

    source: str
    wnids: tuple[str, ...]
    names: tuple[str, ...]


def parse_class_list(text: str, where: str, source: str) -> ClassList:
    """One wnid per line, optionally a name after a tab or spaces; blank and ``#`` lines skipped."""
    wnids: list[str] = []
    names: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.strip().split(None, 1)
        if not fields or fields[0].startswith("#"):
            continue
        wnid = fields[0]
        if wnid in seen:
            raise ConversionError(f"{where}: line {number}: {wnid} is already listed on line {seen[wnid]}")
        if "/" in wnid or wnid in (".", ".."):
            raise ConversionError(f"{where}: line {number}: expected a wnid (a directory name), found {wnid!r}")
        seen[wnid] = number
        wnids.append(wnid)
        names.append(fields[1].strip() if len(fields) > 1 else wnid)
    if not wnids:
        raise ConversionError(f"{where}: expected one wnid per line, found none")
    return ClassList(source, tuple(wnids), tuple(names))


@functools.cache
def builtin_class_list(name: str) -> ClassList:
    """A class list shipped with the package (``shard_tools/formats/imagenet100/<name>.txt``)."""
    text = resources.files("shard_tools.formats.imagenet100").joinpath(f"{name}.txt").read_text("utf-8")
    return parse_class_list(text, f"the built-in {name} class list", name)


def load_class_list(spec: str) -> ClassList:
    """``"cmc"`` or ``"hjepa"`` (shipped with the package), else a class list file."""
    if spec in BUILTIN_LISTS:
        return builtin_class_list(spec)
    path = Path(spec)
    if not path.is_file():
        raise ConversionError(f"{path}: class list: expected {' or '.join(BUILTIN_LISTS)} or a file with one "
                              "wnid per line, found no such file")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: class list: cannot read it ({e})") from e
    return parse_class_list(text, str(path), f"file:{path.name}")
