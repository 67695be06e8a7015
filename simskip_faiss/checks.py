"""Input validation: the one place that says which vectors, ids, files and search arguments are accepted.

Every entry point (RefinedIndex, the refiners, training, data sets, the CLI, Milvus) funnels its
input through these helpers, so bad input fails early with a message that names the problem,
before anything is refined or stored.

The vector contract, the same everywhere:
- an array (or anything `np.asarray` turns into one) of shape (n, d), n >= 1 unless stated;
- real numbers: float16/32/64 and integer dtypes are converted to float32, as FAISS's own Python
  API does (quantised int8 embeddings are real input); bool, complex, object and string arrays
  are refused, since casting them would hide a caller bug;
- every value finite *after* the conversion to float32: NaN, Inf, and float64 values beyond
  float32's range (|x| > 3.4e38, which would become Inf) are refused, naming the first bad row.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
from .errors import InputError, InputTypeError

CHUNK = 65536  # rows scanned at a time: memmaps stay lazy


def _as_array(x, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__array__") or isinstance(x, (list, tuple)):
        try:
            return np.asarray(x)
        except ValueError as e:  # ragged nested lists
            raise InputError(f"{name} is not a rectangular (n, d) array: {e}") from None
    raise InputTypeError(f"{name} must be a numpy array of shape (n, d), got {type(x).__name__}")


def check_shape(x: np.ndarray, d: int | None = None, name: str = "x", allow_empty: bool = False) -> None:
    """Dtype and shape of the vector contract, without touching the values (cheap on a memmap)."""
    if x.dtype.kind not in "fiu":
        raise InputTypeError(f"{name} must hold real numbers convertible to float32 (a float or integer dtype), "
                        f"got dtype {x.dtype}")
    if x.ndim != 2:
        raise InputError(f"{name} must be 2-D (n, d), got {x.ndim}-D array of shape {x.shape}")
    if x.shape[0] == 0 and not allow_empty:
        raise InputError(f"{name} is an empty batch (0 vectors)")
    if x.shape[1] == 0:
        raise InputError(f"{name} has dimension 0")
    if d is not None and x.shape[1] != d:
        raise InputError(f"{name} has dimension {x.shape[1]}, expected {d}")


def to_float32(x: np.ndarray) -> np.ndarray:
    """C-contiguous float32 copy (or `x` itself when it already is one); overflow becomes Inf, silently."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(x, dtype=np.float32)


def nonfinite_rows(x: np.ndarray, chunk: int = CHUNK,
                   after_chunk: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Indices of the rows of `x` that hold NaN or Inf once converted to float32 (scanned in chunks).

    `after_chunk(start, stop)` runs once each chunk is scanned (the index uses it to unmap a memmap's pages).
    """
    bad = []
    for start in range(0, x.shape[0], chunk):
        stop = min(start + chunk, x.shape[0])
        block = np.asarray(x[start:stop])
        if block.dtype != np.float32 and block.dtype.kind == "f":
            block = to_float32(block)
        rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if after_chunk is not None:
            after_chunk(start, stop)
        if rows.size:
            bad.append(rows + start)
    return np.concatenate(bad) if bad else np.empty(0, dtype=np.int64)


def check_finite(x: np.ndarray, name: str = "x", chunk: int = CHUNK,
                 after_chunk: Callable[[int, int], None] | None = None) -> None:
    """Raise ValueError naming the first row that holds NaN or Inf after conversion to float32."""
    bad = nonfinite_rows(x, chunk, after_chunk)
    if bad.size:
        row = int(bad[0])
        beyond = np.isfinite(np.asarray(x[row])).all()
        why = ": values beyond float32's range (|x| > 3.4e38)" if beyond else ""
        raise InputError(f"{name} contains NaN or Inf after conversion to float32 (first at row {row}{why}; "
                         f"{bad.size} bad row(s))")


def check_matrix(x, d: int | None = None, name: str = "x", allow_empty: bool = False) -> np.ndarray:
    """Validate dtype, shape and finiteness without copying: memmaps are scanned in chunks, not loaded."""
    x = _as_array(x, name)
    check_shape(x, d, name, allow_empty)
    check_finite(x, name)
    return x


def as_matrix(x, d: int | None = None, name: str = "x", allow_empty: bool = False) -> np.ndarray:
    """Return `x` as a C-contiguous float32 (n, d) array of finite values, or raise ValueError/TypeError."""
    x = _as_array(x, name)
    check_shape(x, d, name, allow_empty)
    x = to_float32(x)
    check_finite(x, name)
    return x


def as_ids(ids, n: int | None = None, name: str = "ids", to_store: bool = True) -> np.ndarray:
    """Return `ids` as a 1-D int64 array (of length n when given), refusing ids that cannot be stored.

    Always refused: non-integer dtypes, values outside int64, other shapes. Ids `to_store` (the
    default; False for ids to remove or delete) must also not be -1 (FAISS's "no result" marker: a
    stored -1 could not be told from an empty result slot) and not repeat within the call (one of
    the two vectors would be unreachable by id). Ids already stored are the store's business (see
    RefinedIndex.add_with_ids). An empty list is a valid empty batch. RefinedIndex, Milvus and
    Spark share this rule.
    """
    ids = np.asarray(ids)
    if ids.size == 0 and ids.dtype.kind not in "iu":
        ids = ids.astype(np.int64)  # [] arrives as float64: an empty batch, not a dtype error
    if ids.dtype.kind not in "iu":
        raise InputTypeError(f"{name} must be an integer array, got dtype {ids.dtype}")
    if ids.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {ids.shape}")
    if n is not None and ids.shape[0] != n:
        raise InputError(f"{name} has length {ids.shape[0]}, expected {n} (one per vector)")
    if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise InputError(f"{name} has values that do not fit in int64")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if to_store and ids.size:
        minus = np.flatnonzero(ids == -1)
        if minus.size:
            raise InputError(f"{name} contains -1 (at position {int(minus[0])}): FAISS returns -1 for "
                             f"'no result', so it cannot be a stored id")
        uniq, counts = np.unique(ids, return_counts=True)
        if uniq.size != ids.size:
            dup = uniq[counts > 1]
            raise InputError(f"{name} contains {dup.size} duplicated id(s), e.g. {dup[:5].tolist()}: "
                             f"each vector needs its own id")
    return ids


# FAISS takes k as a C int; beyond it the search throws std::bad_alloc inside OpenMP and aborts the process
MAX_K = 2 ** 31 - 1
# most entries in a search's (n, k) result arrays: 2**31 - 1 entries are 24 GiB (float32 distance + int64 id)
MAX_RESULTS = 2 ** 31 - 1


def check_k(k, n: int | None = None) -> int:
    """Validate a neighbour count: a positive integer, at most MAX_K (FAISS's int k); with `n` (query
    rows), n * k at most MAX_RESULTS. k above ntotal is allowed: FAISS pads the missing hits with id -1
    (and the metric's worst distance), and so do RefinedIndex and MicroBatcher."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputTypeError(f"k must be an integer, got {type(k).__name__}")
    k = int(k)
    if k <= 0:
        raise InputError(f"k must be positive, got {k}")
    if k > MAX_K:
        raise InputError(f"k must be at most {MAX_K} (FAISS takes k as a 32-bit int), got {k}")
    if n is not None and n * k > MAX_RESULTS:
        raise InputError(f"k={k} for {n} queries asks for {n * k} (n, k) results, more than {MAX_RESULTS} "
                         f"(24 GiB of distances and ids); search fewer queries at a time or a smaller k")
    return k


def check_radius(radius, metric_is_l2: bool) -> float:
    """A finite range-search radius; an L2 radius (a squared distance) must also be non-negative."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"radius must be a number, got {type(radius).__name__}")
    r = float(radius)
    if not math.isfinite(r):
        raise InputError(f"radius must be a finite number, got {r}")
    if metric_is_l2 and r < 0:
        raise InputError(f"an L2 radius is a squared distance and cannot be negative, got {r}")
    return r


def load_npy(path: str | os.PathLike, what: str = "array", mmap: bool = True) -> np.ndarray:
    """One array from a .npy file, memory-mapped by default and never unpickled.

    Raises FileNotFoundError or ValueError naming `what` and the path (missing file, not a .npy
    file, an .npz archive, an object array that would need pickle, a truncated file).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    with open(p, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"PK":
        raise InputError(f"{what} file {p} is an .npz archive, not a single .npy array")
    if magic != b"\x93NUMPY":
        raise InputError(f"{what} file {p} is not a .npy file")
    try:
        arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{what} file {p} is not a readable .npy array without pickle ({e})") from None
    return arr


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; zero rows stay zero (eps 1e-12, as torch's F.normalize).

    Norms are summed in float64, so every finite float32 row (even |x| ~ 1e30) comes out unit-length.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))[:, None]
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def file_sha256(path: str | os.PathLike, start: int = 0, length: int | None = None, chunk: int = 1 << 22) -> str:
    """sha256 of a file, or of `length` bytes from offset `start`, read in chunks."""
    h = hashlib.sha256()
    left = math.inf if length is None else int(length)
    with open(path, "rb") as f:
        f.seek(start)
        while left > 0 and (block := f.read(int(min(chunk, left)))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def as_id_list(ids) -> list | None:
    """Row ids (an Arrow array, numpy array or sequence) as a list of Python values, for messages; None stays None."""
    if ids is None:
        return None
    return ids.to_pylist() if hasattr(ids, "to_pylist") else ids.tolist() if hasattr(ids, "tolist") else list(ids)
