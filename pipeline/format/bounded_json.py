"""JSON from outside (shard headers, manifests) parsed within bounds of size and depth.

``json.loads`` has no limits: a 64 MB header is parsed whole and a deeply nested one raises
``RecursionError``. :func:`load_json` refuses input over ``max_bytes`` and nesting deeper
than ``max_depth`` before parsing (the depth is measured with array operations, outside
strings), and turns every parse failure into the caller's project error.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.errors import PipelineError, quoted

MAX_DEPTH = 32  # a schema or manifest nests 5 levels deep
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text, brackets inside strings not counted.
    A quote is a string delimiter unless an odd number of backslashes precede it."""
    chars = np.frombuffer(data, dtype=np.uint8)
    if not len(chars):
        return 0
    positions = np.arange(len(chars))
    backslash = chars == ord("\\")
    last_other = np.maximum.accumulate(np.where(backslash, -1, positions))  # last non-backslash at or before i
    run_before = np.empty(len(chars), dtype=np.int64)  # backslashes right before i
    run_before[0] = 0
    run_before[1:] = positions[:-1] - last_other[:-1]
    delimiter = (chars == ord('"')) & (run_before % 2 == 0)
    in_string = (np.cumsum(delimiter) - delimiter) % 2 == 1  # a delimiter itself is outside
    steps = np.where(in_string | delimiter, 0, _OPEN[chars]).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


def load_json(data: bytes | str, *, where: str, error: type[PipelineError], max_bytes: int,
              max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(data)``, or ``error`` naming ``where`` when the text is larger than
    ``max_bytes``, nests deeper than ``max_depth``, or is not JSON."""
    raw = data.encode("utf-8", errors="surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise error(f"{where}: expected at most {max_bytes} bytes of JSON, found {len(raw)}")
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise error(f"{where}: expected JSON nested at most {max_depth} deep, found {depth} levels")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{where}: expected JSON, found unparsable text ({quoted(str(e))})") from e
