"""Every tool's loader over one workload: each ``iter()`` is one epoch of batches.

All of them yield ``(images, labels)``: uint8 ``[B, C, H, W]`` and ``{head: int64 [B]}``
(ours adds ``head + ".value"`` float32 for quantized heads), with shuffling on, batches of
``batch_size`` and two DataLoader workers. Each peer is used the way its documentation
shows, with the cheapest decode we found: raw pixels are viewed with ``np.frombuffer``,
JPEGs go through ``torchvision.io.decode_jpeg`` (faster here than Pillow, which is what
WebDataset's own ``decode("torchrgb8")`` uses). Every loader is built before the clock
starts; DataLoader workers start inside each timed epoch (no ``persistent_workers``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import decode_jpeg

from benchmarks.workloads import Workload, vimh_classes
from pipeline.io.reading import read_manifest

# np.frombuffer over bytes is read-only; the view is only read (collate copies it).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]
Image = torch.Tensor | np.ndarray


def decode_raw(shape: tuple[int, int, int], data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, np.uint8).reshape(shape))


def decode_jpg(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def decoder(w: Workload) -> Callable[[bytes], torch.Tensor]:
    return partial(decode_raw, w.shape) if w.encoding == "raw" else decode_jpg


class Epochs:
    """Re-iterable: each ``iter()`` runs ``make()`` for one epoch and maps each batch with
    ``convert`` (in the main process) into ``(images, {head: labels})``."""

    def __init__(self, make: Callable[[], Iterable[Any]], convert: Callable[[Any], Batch],
                 loader: DataLoader | None = None) -> None:
        self.make, self.convert, self.loader = make, convert, loader

    def __iter__(self) -> Iterator[Batch]:
        return map(self.convert, self.make())

    def close(self) -> None:
        """Stop persistent workers now. litdata's ignore the DataLoader's shutdown signal and
        are only terminated after two 5 s join timeouts; this skips the wait (untimed)."""
        iterator = getattr(self.loader, "_iterator", None)
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():
                worker.terminate()


def _pair(batch: Any) -> Batch:
    return batch[0], batch[1]


# --- ours -------------------------------------------------------------------------------------

def ours(w: Workload, *, batch_size: int, workers: int, source: str | None = None,
         storage_options: dict[str, Any] | None = None) -> Iterable[Batch]:
    from pipeline.loading.make_loader import make_loader

    return make_loader(source or str(w.ours), split="train", batch_size=batch_size,
                       num_workers=workers, shuffle=True, seed=0, storage_options=storage_options)


# --- plain webdataset on our shards ------------------------------------------------------------

def _wds_sample(image: Callable[[bytes], Image], heads: tuple[str, ...], sample: tuple[bytes, bytes]) -> tuple:
    record = msgpack.unpackb(sample[1])
    return (image(sample[0]), *(record[h]["class"] for h in heads))


def _wds_raw(shape: tuple[int, int, int], data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(shape)  # collated by np.array, no per-sample tensor


def webdataset(w: Workload, *, batch_size: int, workers: int, persistent: bool = False,
               buffer: int = 1000, image: Callable[[bytes], Image] | None = None) -> Iterable[Batch]:
    """``WebDataset(...).shuffle(1000).to_tuple(...).map(...).batched(B)`` in a DataLoader with
    ``batch_size=None``; WebDataset's default collation stacks numpy images / ints. ``image``:
    bytes to image (default: the workload's decoder)."""
    import webdataset as wds

    urls = [str(w.ours / "train" / s.name) for s in read_manifest(str(w.ours / "train" / "manifest.json")).shards]
    image = image or (partial(_wds_raw, w.shape) if w.encoding == "raw" else decode_jpg)
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker)
               .shuffle(buffer).to_tuple(w.encoding, "labels.msgpack")
               .map(partial(_wds_sample, image, w.heads)).batched(batch_size))
    heads = w.heads

    def convert(batch: Any) -> Batch:
        return batch[0], dict(zip(heads, batch[1:], strict=True))

    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=persistent)
    return Epochs(lambda: loader, convert)


# --- litdata -----------------------------------------------------------------------------------

def _item(image: Callable[[bytes], torch.Tensor], heads: tuple[str, ...], item: dict[str, Any]) -> tuple:
    return image(item["image"]), {h: item[h] for h in heads}


def litdata(w: Workload, root: Path, *, batch_size: int, workers: int, persistent: bool = False,
            batch_decode: int | str = 0, image: Callable[[bytes], torch.Tensor] | None = None) -> Iterable[Batch]:
    """``StreamingDataset(dir, shuffle=True, transform=decode, batch_decode=...)`` +
    ``StreamingDataLoader``. ``batch_decode=0`` (decode item by item) was several times faster
    with two workers on raw32 than the default ``"auto"`` and no slower on JPEG; both are run."""
    from litdata import StreamingDataLoader, StreamingDataset

    cache = root.parent / f"{root.name}-cache-{batch_decode}-{persistent}"
    dataset = StreamingDataset(str(root), cache_dir=str(cache), shuffle=True, seed=0,
                               transform=partial(_item, image or decoder(w), w.heads), batch_decode=batch_decode)
    loader = StreamingDataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True,
                                 persistent_workers=persistent)
    return Epochs(lambda: loader, _pair, loader)


# --- mosaicml-streaming ------------------------------------------------------------------------

def _mds_class() -> type:
    from streaming import StreamingDataset

    class DecodedMDS(StreamingDataset):
        """The documented pattern: subclass and decode in ``__getitem__``."""

        def __init__(self, image: Callable[[bytes], torch.Tensor], heads: tuple[str, ...], **kw: Any) -> None:
            super().__init__(**kw)
            self.image, self.heads = image, heads

        def __getitem__(self, idx: Any) -> tuple:
            return _item(self.image, self.heads, super().__getitem__(idx))

    return DecodedMDS


def mosaicml_streaming(w: Workload, root: Path, *, batch_size: int, workers: int, persistent: bool = False,
                       image: Callable[[bytes], torch.Tensor] | None = None) -> Iterable[Batch]:
    """``StreamingDataset(local=dir, shuffle=True, batch_size=B)`` + ``DataLoader(batch_size=B)``."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    dataset = _mds_class()(image or decoder(w), w.heads, local=str(root), shuffle=True, shuffle_seed=0,
                           batch_size=batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=persistent)
    return Epochs(lambda: loader, _pair)


# --- the seeds' approach: everything in memory, map-style ---------------------------------------

class InMemory(Dataset):
    """Samples held in memory: a pixel array (raw) or a list of JPEG bytes, plus class arrays."""

    def __init__(self, images: np.ndarray | list[bytes], labels: dict[str, np.ndarray],
                 image: Callable[[Any], torch.Tensor]) -> None:
        self.images, self.image = images, image
        self.labels = {h: c.tolist() for h, c in labels.items()}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, int]]:
        return self.image(self.images[i]), {h: c[i] for h, c in self.labels.items()}


def _from_row(shape: tuple[int, int, int], row: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(row.reshape(shape))


def seeds(w: Workload, *, batch_size: int, workers: int, persistent: bool = False) -> Iterable[Batch]:
    """The whole VIMH pickle (raw32) or every JPEG's bytes (jpeg256) in memory, behind a map-style
    Dataset; ``DataLoader(shuffle=True)`` with the default collate."""
    if w.source is not None:
        manifest = read_manifest(str(w.ours / "train" / "manifest.json"))
        data, labels = vimh_classes(w.source, manifest.schema)
        dataset = InMemory(data, labels, partial(_from_row, w.shape))
    else:
        dataset = InMemory(list(w.images), w.labels, decode_jpg)
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, generator=generator,
                        persistent_workers=persistent)
    return Epochs(lambda: loader, _pair)


BASE_PEERS = ("webdataset", "litdata", "litdata_default", "mosaicml_streaming", "seeds")
FRESH = "+fresh_workers"  # suffix: DataLoader workers started anew each epoch (the default)
PEERS = (*BASE_PEERS, *(p + FRESH for p in BASE_PEERS if p != "litdata_default"))
TOOLS = ("ours", *PEERS)


def build(tool: str, w: Workload, copies: dict[str, Path], *, batch_size: int, workers: int) -> Iterable[Batch]:
    """The loader of ``tool`` over ``w`` (``copies`` holds the litdata / MDS directories). Peers keep
    their workers across epochs (``persistent_workers=True``, as ours does) unless ``tool`` ends
    with ``FRESH``."""
    name, fresh = tool.removesuffix(FRESH), tool.endswith(FRESH)
    kw: dict[str, Any] = {"batch_size": batch_size, "workers": workers, "persistent": workers > 0 and not fresh}
    if name == "ours":
        return ours(w, batch_size=batch_size, workers=workers)
    if name == "webdataset":
        return webdataset(w, **kw)
    if name in ("litdata", "litdata_default"):
        return litdata(w, copies["litdata"], **kw, batch_decode="auto" if name == "litdata_default" else 0)
    if name == "mosaicml_streaming":
        return mosaicml_streaming(w, copies["mosaicml_streaming"], **kw)
    if name == "seeds":
        return seeds(w, **kw)
    raise ValueError(f"unknown tool {tool!r}")
