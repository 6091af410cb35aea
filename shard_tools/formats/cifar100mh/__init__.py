"""CIFAR-100-MH: VIMH-layout pickles with class heads, or the CIFAR-100 python release
(``docs/sources/cifar100mh.md``)."""

from __future__ import annotations

from shard_tools.formats.base import FormatEntry, Generator
from shard_tools.formats.cifar100mh.reader import Cifar100MhFormat
from shard_tools.formats.cifar100mh.synthetic import generate_cifar100, generate_cifar100mh

FORMAT = FormatEntry(
    name="cifar100mh", help="cifar100mh (CIFAR-100-MH or the CIFAR-100 python release, detected)",
    configure=Cifar100MhFormat,
    generators=(Generator("cifar100mh", "CIFAR-100-MH layout", generate_cifar100mh, (2048, 512),
                          done_message="synthetic CIFAR-100-MH source"),
                Generator("cifar100", "CIFAR-100 python release layout", generate_cifar100, (2048, 512),
                          done_message="synthetic CIFAR-100 (python release layout) source")))
