"""Synthetic CIFAR-100 sources in the real on-disk formats, with labels learnable from pixels.

Two layouts (see ``docs/sources/cifar100mh.md``): CIFAR-100-MH (``train_batch``/``test_batch``
pickles with ``[N, id, value, ...]`` label lists and ``cifar100mh_dataset_info.json``) and the
standard CIFAR-100 python release (``train``/``test``/``meta`` pickles, fine and coarse
labels), whose pickles are written the way the release's were, by Python 2's ``cPickle``
(protocol 2, every string a Python 2 byte string, ``numpy.core`` globals: see
:class:`Python2Pickler`). Images are 32×32×3, planar CHW rows. Each sample's first class ``c`` is drawn as
a pattern: a bright horizontal band in the red plane at rows ``3*(c // 10)`` and a bright
vertical band in the green plane at columns ``3*(c % 10)``, over faint noise; the other
heads are coarser groupings of ``c`` (as CIFAR-100's coarse label groups five fine ones),
so every head can be read from the pixels. Used by the tests and ``make shards
DATASET=cifar100mh``.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import struct
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.errors import ConversionError

HEIGHT, WIDTH, CHANNELS = 32, 32, 3
BAND = 3  # pixels per band of the class pattern
LIT, NOISE = 220, 40


class Python2Pickler(pickle._Pickler):
    """Pickles with the opcodes Python 2's ``cPickle.dump(obj, f, 2)`` used for the CIFAR
    release: ``str`` and ``bytes`` both as Python 2 byte strings (``SHORT_BINSTRING``/
    ``BINSTRING``, what ``pickle.load(f, encoding=...)`` has to decode), and numpy's globals
    under their old ``numpy.core`` names. (Memo numbering and numpy's boolean arguments
    differ from Python 2's bytes; loading is the same.) Python 3's own protocol 2 writes
    bytes as a call to ``_codecs.encode`` on a UTF-8 text: a different file, and three
    times slower to load. Only for the synthetic sources: pickling types other than
    numpy's is not supported."""

    write: Callable[[bytes], object]  # set by pickle._Pickler; declared for mypy
    memoize: Callable[[object], None]
    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)))
            self.write(raw)

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module, name = obj.__module__, name or obj.__qualname__
        if module.startswith("numpy._core"):
            module = "numpy.core" + module[len("numpy._core"):]
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str
    dispatch[type] = save_global
    dispatch[types.FunctionType] = save_global


def python2_pickle(obj: object) -> bytes:
    """``obj`` pickled as Python 2 would have (:class:`Python2Pickler`)."""
    out = io.BytesIO()
    Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


@dataclass(frozen=True)
class ClassParam:
    """A CIFAR-100-MH head as its JSON describes it: classes ``min..max``, stored as the
    class index ``0..max-min``."""

    name: str
    min: int
    max: int
    description: str = ""

    @property
    def num_classes(self) -> int:
        return self.max - self.min + 1


DEFAULT_PARAMS = (
    ClassParam("fine", 0, 99, "synthetic fine class (pattern in the pixels)"),
    ClassParam("coarse", 0, 19, "synthetic coarse class: fine // 5"),
)


def draw_classes(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Planar CHW images ``(n, 3*32*32)`` drawing each class (0..99) as a band pattern."""
    n = len(classes)
    images = rng.integers(0, NOISE, size=(n, CHANNELS, HEIGHT, WIDTH), dtype=np.uint8)
    band = np.arange(HEIGHT) // BAND  # 0..10, the band each row (or column) lies in
    tens, units = (classes // 10)[:, None], (classes % 10)[:, None]
    images[:, 0][np.broadcast_to((band[None, :] == tens)[:, :, None], (n, HEIGHT, WIDTH))] = LIT
    images[:, 1][np.broadcast_to((band[None, :] == units)[:, None, :], (n, HEIGHT, WIDTH))] = LIT
    return images.reshape(n, -1)


def read_class(image: np.ndarray) -> int:
    """The class :func:`draw_classes` drew into one ``(3, 32, 32)`` image (a trivial decoder)."""
    tens = int(np.argmax((image[0] >= LIT).all(axis=1))) // BAND
    units = int(np.argmax((image[1] >= LIT).all(axis=0))) // BAND
    return 10 * tens + units


def _classes(n: int, counts: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """``(n, heads)`` class indices: head 0 at random, head ``j`` its coarser grouping."""
    first = rng.integers(0, counts[0], size=n)
    return np.stack([first * k // counts[0] for k in counts], axis=1).astype(np.int64)


def _check(n_train: int, n_test: int, counts: Sequence[int]) -> None:
    if n_train < 0 or n_test < 0:
        raise ConversionError(f"n_train, n_test: expected >= 0, found {n_train}, {n_test}")
    if not counts or not all(1 <= k <= 100 for k in counts):
        raise ConversionError(f"params: expected 1 or more heads of 1..100 classes, found {list(counts)}")


def generate_cifar100mh(out: str | Path, *, n_train: int = 512, n_test: int = 128, seed: int = 0,
                        params: Sequence[ClassParam] = DEFAULT_PARAMS) -> Path:
    """Write a synthetic CIFAR-100-MH source: ``train_batch``, ``test_batch`` (``data`` and
    ``cifar100mh_labels``) and ``cifar100mh_dataset_info.json``."""
    counts = [p.num_classes for p in params]
    _check(n_train, n_test, counts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        classes = _classes(n, counts, rng)
        lists = [[len(params), *(x for j, v in enumerate(row.tolist()) for x in (j, v))] for row in classes]
        batch = {"data": draw_classes(classes[:, 0], rng), "cifar100mh_labels": lists}
        (out / f"{split}_batch").write_bytes(pickle.dumps(batch, protocol=4))
    info = {"format": "CIFAR-100-MH", "version": "1.0", "dataset_name": out.name,
            "image_size": f"{HEIGHT}x{WIDTH}x{CHANNELS}", "train_samples": n_train, "test_samples": n_test,
            "parameter_names": [p.name for p in params],
            "parameter_mappings": {p.name: {"min": p.min, "max": p.max, "scale": "linear",
                                            "description": p.description} for p in params}}
    (out / "cifar100mh_dataset_info.json").write_text(json.dumps(info, indent=2))
    return out


def generate_cifar100(out: str | Path, *, n_train: int = 500, n_test: int = 100, seed: int = 0,
                      python2: bool = True, bytes_keys: bool = True) -> Path:
    """Write a synthetic source in the CIFAR-100 python release layout: ``train`` and
    ``test`` (``data``, ``fine_labels``, ``coarse_labels``, ``filenames``, ``batch_label``)
    and ``meta`` (``fine_label_names``, ``coarse_label_names``), pickled as the release is
    (``python2``). With ``python2=False`` the files are Python 3 pickles, as a user who
    re-pickled the release has them: keys and strings are bytes with ``bytes_keys`` (as
    ``pickle.load(f, encoding="bytes")`` shows the release), else str."""
    _check(n_train, n_test, [100, 20])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def text(value: str) -> str | bytes:
        return value.encode() if bytes_keys else value

    dump: Callable[[object], bytes] = python2_pickle if python2 else functools.partial(pickle.dumps, protocol=2)

    def write(name: str, content: dict[str, object]) -> None:
        (out / name).write_bytes(dump({text(k): v for k, v in content.items()}))

    for split, n in (("train", n_train), ("test", n_test)):
        classes = _classes(n, [100, 20], rng)
        write(split, {"batch_label": text(f"synthetic {split} batch 1 of 1"),
                      "fine_labels": classes[:, 0].tolist(), "coarse_labels": classes[:, 1].tolist(),
                      "filenames": [text(f"synthetic_{split}_{i:05d}.png") for i in range(n)],
                      "data": draw_classes(classes[:, 0], rng)})
    write("meta", {"fine_label_names": [text(f"fine_{i:02d}") for i in range(100)],
                   "coarse_label_names": [text(f"coarse_{i:02d}") for i in range(20)]})
    return out
