"""Loading: epoch planning, decoding a shard into columns, assembling batches, the stream a
worker runs, the loader and ``make_loader``. Nothing here knows of mixes (``pipeline.mixing``
is one more kind of input and planner)."""
