"""Input validation shared by the refiner, the index and training.

Every public entry point funnels arrays through these helpers so that bad input fails early,
with a message that names the problem, before anything is refined or stored.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def as_matrix(x, d: int | None = None, name: str = "x", allow_empty: bool = False) -> np.ndarray:
    """Return `x` as a C-contiguous float32 (n, d) array, or raise ValueError/TypeError.

    Floating inputs (float16/64) are converted like FAISS does; integer, boolean, complex and
    object arrays are refused, since silently casting them hides a caller bug.
    """
    x = check_matrix(x, d, name, allow_empty)
    return np.ascontiguousarray(x, dtype=np.float32)


def check_matrix(x, d: int | None = None, name: str = "x", allow_empty: bool = False) -> np.ndarray:
    """Validate shape, dtype and finiteness without copying: memmaps are scanned in chunks, not loaded."""
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__array__") or isinstance(x, (list, tuple)):
            x = np.asarray(x)
        else:
            raise TypeError(f"{name} must be a numpy array of shape (n, d), got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a float32 array (n, d), got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got {x.ndim}-D array of shape {x.shape}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is an empty batch (0 vectors)")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} has dimension {x.shape[1]}, expected {d}")
    check_finite(x, name)
    return x


def check_finite(x: np.ndarray, name: str = "x", chunk: int = 65536,
                 after_chunk: Callable[[int, int], None] | None = None) -> None:
    """Raise ValueError naming the first row that holds NaN or Inf (scans in chunks: memmaps stay lazy).

    `after_chunk(start, stop)` runs once each chunk is scanned (the index uses it to unmap a memmap's pages).
    """
    for start in range(0, x.shape[0], chunk):
        stop = min(start + chunk, x.shape[0])
        bad = ~np.isfinite(np.asarray(x[start:stop])).all(axis=1)
        if after_chunk is not None:
            after_chunk(start, stop)
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name} contains NaN or Inf (first at row {row})")


def as_ids(ids, n: int, name: str = "ids") -> np.ndarray:
    """Return `ids` as a 1-D int64 array of length n, refusing float, bool or mis-sized input."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {ids.dtype}")
    if ids.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {ids.shape}")
    if ids.shape[0] != n:
        raise ValueError(f"{name} has length {ids.shape[0]}, expected {n} (one per vector)")
    if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} has values that do not fit in int64")
    return np.ascontiguousarray(ids, dtype=np.int64)


def check_k(k, ntotal: int) -> int:
    """Validate a neighbour count against the number of stored vectors."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    k = int(k)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if k > ntotal:
        raise ValueError(f"k={k} is larger than the number of stored vectors (ntotal={ntotal})")
    return k
