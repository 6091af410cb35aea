"""Mixing several shard sets in one loader: exact per-source counts (``plan``), the union of
their heads (``union``), their transforms (``transforms``) and the ``mix`` entry (``mix``)."""
