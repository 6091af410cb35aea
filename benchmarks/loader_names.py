"""What the loader benchmark calls each tool: short names for the chart and the text, longer
ones (with versions) for the results table."""

from __future__ import annotations

from benchmarks.peers import FRESH

LABELS = {
    "ours": "ours (make_loader)",
    "webdataset": "webdataset on our shards",
    "litdata": "litdata (batch_decode=0)",
    "litdata_default": "litdata (defaults)",
    "mosaicml_streaming": "mosaicml-streaming (MDS)",
    "seeds": "seeds' in-memory Dataset",
}
ROWS = {
    "ours": "**ours**: `make_loader(...)`",
    "webdataset": "webdataset {webdataset} `WebDataset` on our shards",
    "litdata": "litdata {litdata} `StreamingDataset(batch_decode=0)` + `StreamingDataLoader`",
    "litdata_default": "litdata {litdata}, same with default `batch_decode=\"auto\"`",
    "mosaicml_streaming": "mosaicml-streaming {mosaicml-streaming} `StreamingDataset` (MDS)",
    "seeds": "seeds' approach: in memory, map-style `Dataset`",
}



def label(tool: str, table: dict[str, str] = LABELS, **fmt: str) -> str:
    """A tool's name for the chart (or, with ``ROWS``, the table); fresh-worker variants marked."""
    base = table[tool.removesuffix(FRESH)].format(**fmt)
    if tool.endswith(FRESH):
        return f"{base}, workers restarted each epoch" if table is ROWS else f"{base}, restarted workers"
    return base
