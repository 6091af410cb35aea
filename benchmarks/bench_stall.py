"""Part 3 of ``make bench``: the share of SimpleCNN training time spent waiting for data.

Trains SimpleCNN (the default ``simple_cnn`` config) on 32x32x3 VIMH shards with 2 loader
workers and batch 256, and reads the ``DataStall`` callback: time between the end of one
training batch and the start of the next, over that plus the time in the batches. The same
run is repeated with plain webdataset as the loader, for reference.

    python -m benchmarks.bench_stall [--samples N] [--epochs E] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import msgpack
import numpy as np
import torch
import webdataset as wds

from benchmarks.common import machine_info, write_results
from pipeline import make_loader
from shard_tools.convert import convert
from shard_tools.formats.vimh.synthetic import generate_vimh
from training.backbones import SimpleCNN
from training.callbacks import DataStall
from training.module import MultiheadModule

BATCH, WORKERS = 256, 2


def _wds_decode(sample: tuple[bytes, bytes]) -> tuple[torch.Tensor, dict[str, int]]:
    raw, labels = sample
    record = msgpack.unpackb(labels)
    image = torch.from_numpy(np.frombuffer(raw, np.uint8).reshape(3, 32, 32).copy())
    return image, {name: entry["class"] for name, entry in record.items() if not name.startswith("_")}


def _wds_collate(batch: tuple[list[torch.Tensor], list[dict[str, int]]]) -> tuple[torch.Tensor, dict[str, Any]]:
    images, labels = batch
    return torch.stack(images), {k: torch.tensor([d[k] for d in labels]) for k in labels[0]}


def webdataset_loader(root: Path) -> torch.utils.data.DataLoader:
    urls = sorted(str(p) for p in (root / "train").glob("*.tar"))
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), workersplitter=wds.split_by_worker, empty_check=False)
               .shuffle(2000).to_tuple("raw", "labels.msgpack").map(_wds_decode)
               .batched(BATCH, collation_fn=lambda s: _wds_collate(tuple(zip(*s, strict=True)))))  # type: ignore[arg-type]
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=WORKERS, persistent_workers=True)


def run(loader: Any, schema: Any, epochs: int) -> dict[str, float]:
    L.seed_everything(0)
    model = MultiheadModule(schema, backbone=lambda image: SimpleCNN(image),
                            optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3))
    stall = DataStall()
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[stall], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=loader)
    total = stall.waiting + stall.computing
    return {"data_stall_share": stall.share, "waiting_s": stall.waiting, "training_s": total,
            "samples_per_s": trainer.fit_loop.epoch_loop.batch_progress.current.completed * BATCH / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = generate_vimh(Path(tmp) / "vimh-32x32x3_stall", n_train=args.samples, n_test=16, n_heads=2)
        convert("vimh", src, Path(tmp) / "shards", splits=["train"], max_samples=4096)
        ours = make_loader(str(Path(tmp) / "shards"), batch_size=BATCH, num_workers=WORKERS)
        results = {"ours": run(ours, ours.schema, args.epochs),
                   "webdataset": run(webdataset_loader(Path(tmp) / "shards"), ours.schema, args.epochs)}
    for name, r in results.items():
        print(f"{name:<12} data stall {100 * r['data_stall_share']:5.1f}%  ({r['samples_per_s']:.0f} samples/s)")
    write_results(args.out, "stall", {"part": "stall", "machine": machine_info(["torch", "lightning", "webdataset"]),
                                      "samples": args.samples, "epochs": args.epochs, "batch_size": BATCH,
                                      "workers": WORKERS, "results": results, "target": "< 5% for ours"})


if __name__ == "__main__":
    main()
