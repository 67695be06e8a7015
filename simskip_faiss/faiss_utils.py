"""FAISS helpers shared by `RefinedIndex` (index.py), `LinearRefiner.to_faiss` (refiner.py) and Milvus.

Metric names, index construction and checks, streamed-ingest memory helpers. Kept apart from
index.py so that the refiner module can build FAISS indexes without importing the index module.
"""
from __future__ import annotations

import mmap

import faiss
import numpy as np

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
METRIC_NAMES = {v: k for k, v in METRICS.items()}


def metric_code(metric) -> int:
    """'ip' / 'l2' / a faiss.METRIC_* constant -> the FAISS constant."""
    if isinstance(metric, str):
        if metric.lower() not in METRICS:
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        return METRICS[metric.lower()]
    if metric not in METRIC_NAMES:
        raise ValueError(f"unsupported FAISS metric {metric!r}; use inner product or L2")
    return int(metric)


def release_rows(x: np.ndarray, start: int, stop: int) -> None:
    """Unmap rows [start, stop) of a memory-mapped array from this process (madvise MADV_DONTNEED).

    Pages read through a memmap count in the process's resident set until unmapped, so streaming
    a 1.5 GB .npy would otherwise add its whole size to the peak memory of an ingest. The data
    stay in the kernel's page cache. Only 'r' and 'r+' maps (file-backed, shared): dropping a
    copy-on-write ('c') map's pages would discard its writes. Anything else is left alone.
    """
    mm = getattr(x, "_mmap", None)
    if (mm is None or getattr(x, "mode", None) not in ("r", "r+") or not hasattr(mmap, "MADV_DONTNEED")
            or not x.flags.c_contiguous or stop <= start):
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        row = x.strides[0]
        lo = x.ctypes.data - base + start * row
        hi = min(x.ctypes.data - base + stop * row, len(mm))
        lo -= lo % mmap.PAGESIZE
        if hi > lo >= 0:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError, TypeError, BufferError):
        pass  # an optimisation only


def reserve(index: faiss.Index, n: int) -> None:
    """Grow a flat index's code storage once, to hold `n` more vectors, before they are streamed in.

    Adding chunk by chunk grows FAISS's std::vector by doubling; near the end of a large ingest the
    old and the new buffer are both resident (up to ~2x the index). Resizing up then back down
    keeps the capacity (the standard guarantees it), so later adds never reallocate. Only flat
    codes (Flat, SQ, PQ, ...) own one such buffer; other indexes are left alone.
    """
    idx = faiss.downcast_index(index)
    while isinstance(idx, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        idx = faiss.downcast_index(idx.index)
    if not isinstance(idx, faiss.IndexFlatCodes) or not idx.codes.is_owned:
        return
    have, need = idx.ntotal * idx.code_size, (idx.ntotal + int(n)) * idx.code_size
    if idx.codes.size() == have and need > have:
        idx.codes.resize(need)
        idx.codes.resize(have)


def build_index(index, d: int, metric, refiner) -> faiss.Index:
    """A FAISS index of dimension `d` for vectors refined by `refiner`: built from a factory string or checked.

    Refuses a metric mismatch, a dimension mismatch, and an inner-product index behind a refiner
    that does not L2-normalise (recall collapses without renormalisation).
    """
    metric = metric_code(metric)
    if isinstance(index, str):
        try:
            index = faiss.index_factory(d, index, metric)
        except RuntimeError as e:
            raise ValueError(f"FAISS could not build {index!r}: {str(e).strip().splitlines()[-1]}") from None
    else:
        if not isinstance(index, faiss.Index):
            raise TypeError(f"index must be a faiss.Index or a factory string, got {type(index).__name__}")
        if index.metric_type != metric:
            raise ValueError(f"the index uses metric {METRIC_NAMES.get(index.metric_type, index.metric_type)!r} "
                             f"but metric={METRIC_NAMES[metric]!r} was given")
    if index.d != d:
        raise ValueError(f"refiner outputs {d}-d vectors but the index has dimension {index.d}")
    if (metric == faiss.METRIC_INNER_PRODUCT and refiner.apply_to == "both"
            and not refiner.is_identity and not refiner.normalize):
        raise ValueError("an inner-product index needs a refiner that L2-normalises its output; "
                         "this refiner does not (use metric='l2' or export with normalize=True)")
    return index
