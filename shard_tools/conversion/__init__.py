"""How a conversion runs, below the one entry point :func:`shard_tools.convert.convert`: the
split plan every strategy starts from, the strategies (one process writing in order,
planned slices over worker processes, node shares), staging and resume, and the upload
of finished splits to object storage."""
