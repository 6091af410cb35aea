"""``shards inspect``: a shard set's schema and counts, and a labelled PNG grid of samples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.format.labels import decode_labels
from pipeline.format.schema import DatasetSchema
from pipeline.io.reading import decode_image, iter_shard, read_header
from pipeline.io.shard_sets import ShardSet, resolve_shards


def summarize(source: str | Sequence[str], storage_options: dict[str, Any] | None = None
              ) -> list[dict[str, Any]]:
    """Per split: label, schema, shard count and sample count (from the manifest, else counted)."""
    out = []
    for shards in resolve_shards(source, storage_options=storage_options):
        schema = _schema(shards, storage_options)
        if shards.manifest is not None:
            samples = shards.manifest.num_samples
        else:
            samples = sum(1 for url in shards.urls for _ in iter_shard(url, storage_options))
        out.append({"split": shards.label, "schema": schema.to_dict(),
                    "shards": len(shards.urls), "samples": samples})
    return out


def _schema(shards: ShardSet, storage_options: dict[str, Any] | None) -> DatasetSchema:
    return shards.manifest.schema if shards.manifest else read_header(shards.urls[0], storage_options)


def _caption(schema: DatasetSchema, record: dict[str, Any]) -> list[str]:
    lines = []
    for head in schema.heads:
        entry = record.get(head.name, {})
        if head.kind == "quantized":
            lines.append(f"{head.name[:12]}={entry.get('value', float('nan')):.3g} "
                         f"c{entry.get('class')}")
        else:
            names = head.class_names
            cls = entry.get("class", -1)
            lines.append(f"{head.name[:12]}={names[cls] if names and 0 <= cls < len(names) else cls}")
    return lines


def write_grid(source: str | Sequence[str], out_png: str | Path, *, count: int = 16,
               tile: int = 96, storage_options: dict[str, Any] | None = None) -> Path:
    """Write a PNG grid of the first ``count`` samples, each captioned with its head values."""
    shards = resolve_shards(source, storage_options=storage_options)[0]
    schema = _schema(shards, storage_options)
    tiles = []
    for url in shards.urls:
        for key, members in iter_shard(url, storage_options):
            image = decode_image(schema.image, members[schema.image.encoding], f"{url}: {key}")
            record = decode_labels(members["labels.msgpack"], f"{url}: {key}")
            tiles.append(_tile(image, [key, *_caption(schema, record)], tile))
            if len(tiles) >= count:
                break
        if len(tiles) >= count:
            break
    columns = max(1, min(8, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    width, height = tiles[0].size if tiles else (tile, tile)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % columns) * width, (i // columns) * height))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def _tile(chw: np.ndarray, caption: list[str], size: int) -> Image.Image:
    hwc = chw.transpose(1, 2, 0)
    img = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc[:, :, :3])
    img = img.convert("RGB").resize((size, size), Image.Resampling.NEAREST)
    line, width = 11, max(size, 132) + 8  # 22 characters of the default font
    canvas = Image.new("RGB", (width, size + 6 + line * len(caption)), "white")
    canvas.paste(img, (4, 4))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(caption):
        draw.text((4, size + 5 + i * line), text[:22], fill="black")
    return canvas
