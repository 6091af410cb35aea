"""The shard format, read and write side together: the schema, the header, manifests,
label records and columns, and the tar layout (no I/O: bytes in, objects out, and back)."""
