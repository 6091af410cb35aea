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
        label = schema.split if shards.listed_dir else shards.label  # a split directory without its manifest
        out.append({"split": label, "schema": schema.to_dict(), "image": schema.image.describe(),
                    "shards": len(shards.urls), "samples": samples, "incomplete": shards.incomplete})
    return out


def _schema(shards: ShardSet, storage_options: dict[str, Any] | None) -> DatasetSchema:
    return shards.manifest.schema if shards.manifest else read_header(shards.urls[0], storage_options)


def _caption(schema: DatasetSchema, record: dict[str, Any]) -> list[str]:
    """One line per head, the head's whole name: a class head's class name (or index), a
    quantized head's real value and its class's value (``step`` apart)."""
    lines = []
    for head in schema.heads:
        entry = record.get(head.name, {})
        cls = entry.get("class", -1)
        if head.kind == "quantized":
            centre = head.min + cls * head.step if head.step and head.min is not None else cls
            lines.append(f"{head.name}: {entry.get('value', float('nan')):.4g} (class {centre:.4g})")
        else:
            names = head.class_names
            lines.append(f"{head.name}: {names[cls] if names and 0 <= cls < len(names) else cls}")
    return lines


def write_grid(source: str | Sequence[str], out_png: str | Path, *, count: int = 16,
               tile: int = 96, storage_options: dict[str, Any] | None = None) -> Path:
    """Write a PNG grid of the first ``count`` samples, each captioned with its head values."""
    shards = resolve_shards(source, storage_options=storage_options)[0]
    schema = _schema(shards, storage_options)
    found: list[tuple[np.ndarray, list[str]]] = []
    for url in shards.urls:
        for key, members in iter_shard(url, storage_options):
            image = decode_image(schema.image, members[schema.image.encoding], f"{url}: {key}")
            record = decode_labels(members["labels.msgpack"], f"{url}: {key}")
            found.append((image, [key, *_caption(schema, record)]))
            if len(found) >= count:
                break
        if len(found) >= count:
            break
    text_width = CHAR_WIDTH * max((len(line) for _, caption in found for line in caption), default=0)
    tiles = [_tile(image, caption, tile, max(tile, text_width)) for image, caption in found]
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


CHAR_WIDTH, LINE_HEIGHT = 6, 11  # of PIL's default font


def _tile(chw: np.ndarray, caption: list[str], size: int, width: int) -> Image.Image:
    """The image scaled to ``size`` with its caption below, uncut: ``width`` fits the
    grid's longest caption line."""
    hwc = chw.transpose(1, 2, 0)
    img = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc[:, :, :3])
    img = img.convert("RGB").resize((size, size), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (width + 8, size + 6 + LINE_HEIGHT * len(caption)), "white")
    canvas.paste(img, (4, 4))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(caption):
        draw.text((4, size + 5 + i * LINE_HEIGHT), text, fill="black")
    return canvas
