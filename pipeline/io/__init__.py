"""Reading shard sets from local disk or any fsspec URL: storage (with retries, a size-limited
disk cache and one translation of remote errors), shard-set resolution, headers and manifests."""
