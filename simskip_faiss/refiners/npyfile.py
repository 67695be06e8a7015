"""One byte format for small artefacts without pickles: a JSON header, then numpy arrays, as .npy records.

Used by `LinearRefiner.to_bytes` and `DocumentUpdates.to_bytes`; read back with allow_pickle=False.
"""
from __future__ import annotations

import io
import json

import numpy as np

from ..errors import InputError


def pack(header: dict, arrays) -> bytes:
    """`header` (JSON) and `arrays`, back to back as .npy records."""
    buf = io.BytesIO()
    for arr in (np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8), *arrays):
        np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def unpack(data: bytes, n: int, fmt: str, what: str, source: str) -> tuple[dict, list[np.ndarray]]:
    """(header, `n` arrays) of `pack` output whose header "format" is `fmt`; InputError naming `source` else."""
    f = io.BytesIO(bytes(data))
    try:
        raw, *arrays = (np.lib.format.read_array(f, allow_pickle=False) for _ in range(n + 1))
        header = json.loads(raw.tobytes())
    except Exception as e:  # numpy: ValueError/EOFError; json: JSONDecodeError
        raise InputError(f"{source} is not a {what} file ({type(e).__name__}: {e})") from None
    if f.read(1) or not isinstance(header, dict) or header.get("format") != fmt:
        raise InputError(f"{source} is not a {what} file (unexpected header or trailing bytes)")
    return header, arrays
